#!/usr/bin/env bash
# One run on the H200 for the Python side of the CUDA backend: build the nanobind extension with
# VQ_CUDA=ON (sm_90) by a direct CMake build of the _core target (no pip: the machine has no
# network, its system Python may be externally managed, and scikit-build-core may be missing),
# stage it next to the pure-Python package in build_py_h200/site and put that on PYTHONPATH; then
# run the CUDA pytest tests (python/tests/test_cuda.py, test_cuda_files_and_windows.py,
# test_cuda_transformers.py, and test_transformers.py for the CPU integration on the GPU model)
# and the end-to-end transformers benchmark (bench/cuda/e2e_transformers.py). Everything lands
# in $OUT (bench/results/h200_python otherwise). About 5 minutes: build ~1-2, tests <1, e2e <3.
# Usage: OUT=$OUT bash bench/cuda/run_python_h200.sh [extra e2e_transformers.py arguments]
# VQ_STAGES picks the stages (default "build test e2e"); a later call on the same machine can
# run "e2e" alone on the build an earlier call left in build_py_h200. VQ_PREBUILT=DIR (a carried
# folder holding a _core*.so.gz that bench/cuda/prebuilt.sh built on a build machine) makes the
# build stage stage that module instead of compiling one (~3-4 minutes of device time).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/bench/results/h200_python}
mkdir -p "$OUT"
exec > >(tee "$OUT/run_python.log") 2>&1
BUILD=build_py_h200
PY=${PYTHON:-python3}
step() { echo "== $(date -u +%T) $*"; }
status=0
STAGES=" ${VQ_STAGES:-build test e2e} "
has() { [[ "$STAGES" == *" $1 "* ]]; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
nvcc --version | tail -1
"$PY" -c "import sys, torch, transformers, nanobind; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'nanobind', nanobind.__version__)"

SITE="$PWD/$BUILD/site"
if has build && [ -n "${VQ_PREBUILT:-}" ]; then
step "stage the prebuilt _core from $VQ_PREBUILT"
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r python/veloxquant "$SITE/"
for f in "$VQ_PREBUILT"/_core*.so.gz; do
  [ -f "$f" ] || { echo "no _core*.so.gz in $VQ_PREBUILT"; exit 1; }
  gunzip -c "$f" > "$SITE/veloxquant/$(basename "$f" .gz)"
done
elif has build; then
step "configure (VQ_PYTHON=ON, VQ_CUDA=ON, sm_90)"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DVQ_PYTHON=ON -DVQ_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DVQ_BUILD_TESTS=OFF -DVQ_BUILD_BENCH=OFF -DVQ_BUILD_TOOLS=OFF \
  -DPython_EXECUTABLE="$(command -v "$PY")" > "$OUT/configure_python.log" 2>&1 \
  || { tail -30 "$OUT/configure_python.log"; exit 1; }
step "build _core"
cmake --build "$BUILD" -j "$(nproc)" --target _core > "$OUT/build_python.log" 2>&1 \
  || { grep -E "error|Error" "$OUT/build_python.log" | head -40; exit 1; }
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r python/veloxquant "$SITE/"
cp "$BUILD"/python/_core*.so "$SITE/veloxquant/"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import veloxquant, veloxquant.cuda as c; print('veloxquant from', veloxquant.__file__, '| HAS_CUDA', c.HAS_CUDA, '| available', c.is_available())" \
  || exit 1

if has test; then
step "pytest: python/tests/test_cuda.py python/tests/test_cuda_files_and_windows.py python/tests/test_cuda_transformers.py python/tests/test_gpu_layer_logic.py python/tests/test_transformers.py"
timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" \
  python/tests/test_cuda.py python/tests/test_cuda_files_and_windows.py python/tests/test_cuda_transformers.py \
  python/tests/test_gpu_layer_logic.py \
  python/tests/test_transformers.py \
  || status=1
fi

# The whole run stays under ~9.5 minutes (the device tool's limit is 10): the e2e gets what is
# left, and starts a further context only while its own budget allows.
if has e2e; then
left=$((${VQ_E2E_SECONDS:-560} - SECONDS))
[ "$left" -lt 120 ] && left=120
step "e2e: transformers Llama 8B-like shape, VeloxQuantCache on the GPU vs DynamicCache (${left} s left)"
timeout "$left" "$PY" bench/cuda/e2e_transformers.py --out "$OUT/e2e_transformers.json" \
  --budget-s $((left - 100)) "$@" || status=1
fi
step "done (status $status)"
exit $status
