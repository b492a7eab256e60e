#!/usr/bin/env bash
# One run on the H200: configure (VQ_CUDA=ON, sm_90), build the CUDA library, the parity tests and
# the benchmarks, run the parity tests (plus compute-sanitizer on the batched decode, the batch
# classes and the generic path), time our fused decode and encode, every method on the generic path, and torch
# bf16 SDPA at the same shapes in the same run, alternately with our decode through the Python
# API in SDPA's process (the build stage builds that extension alongside, with
# run_python_h200.sh). VQ_STAGES picks stages (default "build parity bench codecs sdpa").
# Everything lands in $OUT (the device tool's output folder; bench/results/h200 otherwise).
# VQ_NCU_POINTS="METHOD:D:B:N ..." picks the decode points ncu profiles (default k1v2:128:8:131072);
# VQ_NCU_CODECS="METHOD:N ..." profiles the generic path's attention kernel (stage codecs).
set -uo pipefail
cd "$(dirname "$0")/../.."
export VQ_BENCH_COMMAND="bash bench/cuda/run_h200.sh"  # recorded in the JSON results
OUT=${OUT:-$PWD/bench/results/h200}
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
BUILD=build_h200
JOBS=$(nproc)
step() { echo "== $(date -u +%T) $*"; }
STAGES=" ${VQ_STAGES:-build parity bench codecs sdpa} "
has() { [[ "$STAGES" == *" $1 "* ]]; }

step "device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total,power.limit,enforced.power.limit --format=csv
nvcc --version | tail -1

if has build; then
step "configure"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DVQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DVQ_BUILD_TESTS=ON -DVQ_BUILD_BENCH=ON -DVQ_BUILD_TOOLS=OFF > "$OUT/configure.log" 2>&1 \
  || { tail -30 "$OUT/configure.log"; exit 1; }
step "build (and the Python extension alongside: $OUT/run_python.log)"
OUT="$OUT" VQ_STAGES=build bash bench/cuda/run_python_h200.sh > /dev/null 2>&1 &
python_build=$!
cmake --build "$BUILD" -j "$JOBS" --target test_cuda_parity test_cuda_codec_cache test_cuda_batch \
  test_decode_split test_codec_split test_stage_rows_device test_mma_portable_device test_rabitq_scan_device \
  bench_cuda_attention bench_codec_cache > "$OUT/build.log" 2>&1 \
  || { grep -E "error|Error" "$OUT/build.log" | head -40; exit 1; }
wait "$python_build" || echo "(the Python extension did not build: SDPA is timed without our API)"
fi

if has parity; then
step "parity tests"
for t in test_decode_split test_codec_split test_stage_rows_device test_mma_portable_device test_rabitq_scan_device; do
  "$BUILD/tests/cuda/$t" 2>&1 | grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Which is" | head -6 | sed "s/^/$t: /"
done
"$BUILD/tests/cuda/test_cuda_parity" --gtest_output="json:$OUT/parity.json" 2>&1 | tail -40
"$BUILD/tests/cuda/test_cuda_codec_cache" --gtest_output="json:$OUT/parity_codecs.json" 2>&1 \
  | grep -E "^\[  (FAILED|PASSED|  OK) |Failure|Expected|Which is|error|differ" | head -80
"$BUILD/tests/cuda/test_cuda_batch" --gtest_output="json:$OUT/parity_batch.json" 2>&1 \
  | grep -E "^\[  (FAILED|PASSED|  OK) |Failure|Expected|Which is|error" | head -20
step "compute-sanitizer (memcheck, racecheck) on the batched decode, every decode layout and the generic path"
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool "$tool" --print-limit 5 \
    "$BUILD/tests/cuda/test_cuda_parity" --gtest_filter='*BatchedDecode*:*EachTableCopyCount*' 2>&1 | tail -6
  timeout 60 compute-sanitizer --tool "$tool" --print-limit 5 \
    "$BUILD/tests/cuda/test_cuda_codec_cache" --gtest_filter='*tq_d96*:*rabitq*:*commvq*:*qjl*:*fp16_d96*' 2>&1 | tail -6
  timeout 60 compute-sanitizer --tool "$tool" --print-limit 5 "$BUILD/tests/cuda/test_cuda_batch" 2>&1 | tail -6
done
fi

if has codecs; then
step "every method on the generic path"
"$BUILD/bench/cuda/bench_codec_cache" "$OUT/codec_bench.json"
step "every method on the generic path, 8 sequences of 32K in one batched call"
"$BUILD/bench/cuda/bench_codec_cache" "$OUT/codec_bench_batch8.json" "" 32768 8 | grep batch
if command -v ncu >/dev/null && [ -n "${VQ_NCU_CODECS:-}" ]; then
  for point in $VQ_NCU_CODECS; do
    echo "-- ncu generic $point"
    # skip the warm-up and most timed launches; profile one decode (n_queries = 1) launch
    timeout 120 ncu --clock-control none --kernel-name regex:codec_attention_kernel --launch-skip 5 \
      --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats --section InstructionStats --section SchedulerStats \
      "$BUILD/bench/cuda/bench_codec_cache" /tmp/ncu_codec.json "${point%%:*}" "${point##*:}" \
      >> "$OUT/ncu_codecs.txt" 2>&1
  done
  grep -E "^-- ncu|codec_attention_kernel|Duration|DRAM Throughput|Issue Slots Busy|Executed Ipc A|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Executed Instructions  |Dynamic Shared|Stall|Theoretical Occ" "$OUT/ncu_codecs.txt"
fi
fi

if has bench; then
step "benchmark"
"$BUILD/bench/cuda/bench_cuda_attention" "$OUT/cuda_bench.json"
if command -v ncu >/dev/null; then
  step "ncu: the decode kernel at ${VQ_NCU_POINTS:-k1v2:128:8:131072}"
  for point in ${VQ_NCU_POINTS:-k1v2:128:8:131072}; do
    echo "-- ncu $point"
    timeout 90 ncu --clock-control none --kernel-name regex:decode_attention --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section Occupancy --section LaunchStats \
      "$BUILD/bench/cuda/bench_cuda_attention" /tmp/ncu_point.json "$point" >> "$OUT/ncu.txt" 2>&1
  done
  grep -E "^-- ncu|Duration|DRAM Throughput|L1/TEX Hit|Mem Pipes Busy|Compute \(SM\)|Issue Slots Busy|Executed Ipc A|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Dynamic Shared|Block Limit Shared|Block Limit Reg" "$OUT/ncu.txt"
fi
fi
if has sdpa && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  step "torch bf16 SDPA, and our decode through the Python API in the same process"
  PYTHONPATH="$PWD/build_py_h200/site${PYTHONPATH:+:$PYTHONPATH}" \
    python3 bench/cuda/torch_sdpa.py "$OUT/torch_sdpa.json" "$OUT/cuda_bench.json"
else
  step "no SDPA comparison (stage skipped, or torch not importable)"
fi
step "done"
