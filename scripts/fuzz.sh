#!/usr/bin/env bash
# Fuzzes the file loaders (cache, calibration and GGUF files), the tokenizer and sequences of
# cache calls with libFuzzer under AddressSanitizer and UndefinedBehaviorSanitizer, in build-fuzz/
# (clang; Debian: clang, libclang-rt-14-dev, libomp-14-dev).
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET=300] [cache|calibration|gguf|tokenizer|cache_ops ...]
# Each target starts from the seeds make_fuzz_seeds writes and keeps its corpus in
# build-fuzz/corpus/KIND between runs; a finding is written to build-fuzz/findings/KIND/ and
# fails the run (an input slower than 30 s is reported and skipped: forged shapes can make a
# loader build rotations for thousands of heads). Copy a finding, once fixed, to
# tests/fuzz/regressions/KIND/ so that ctest replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
shift || true
kinds=("$@")
[ ${#kinds[@]} -gt 0 ] || kinds=(cache calibration gguf tokenizer cache_ops)
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DVQ_CUDA=OFF -DVQ_BUILD_BENCH=OFF -DVQ_BUILD_TOOLS=OFF -DVQ_FUZZ=ON \
  -DCMAKE_CXX_FLAGS="$flags -fsanitize=fuzzer-no-link" -DCMAKE_EXE_LINKER_FLAGS="$flags" >/dev/null
targets=(make_fuzz_seeds)
for k in "${kinds[@]}"; do targets+=("fuzz_${k}"); done
cmake --build build-fuzz --parallel "$(nproc)" --target "${targets[@]}"
build-fuzz/tests/fuzz/make_fuzz_seeds build-fuzz/seeds >/dev/null
export ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1
status=0
for k in "${kinds[@]}"; do
  mkdir -p "build-fuzz/corpus/$k" "build-fuzz/findings/$k"
  echo "== fuzz_${k} for ${seconds} s"
  if ! build-fuzz/tests/fuzz/fuzz_${k} "build-fuzz/corpus/$k" "build-fuzz/seeds/$k" \
      -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=30 -fork=1 -ignore_timeouts=1 \
      -print_final_stats=1 \
      -artifact_prefix="build-fuzz/findings/$k/" 2>&1 | tail -25; then
    status=1
  fi
done
exit $status
