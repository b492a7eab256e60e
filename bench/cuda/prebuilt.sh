#!/usr/bin/env bash
# Device binaries built here, for a device run that only runs them. A device call that builds
# spends ~3.5 minutes of its device time compiling the CUDA library (ab_h200.sh: every variant);
# the build machines compile the same sm_90 code, and the binaries should run there (glibc and
# libstdc++ there are newer than here, the CUDA runtime is linked statically, libgomp comes with
# its compilers); where a call reports a loader error, build there with ab_h200.sh instead.
# Built for sm_90 only (no PTX) and stripped, a test or benchmark binary is ~16 MB gzipped, so
# three fit in a call's 64 MiB; the target test_cuda_all (every CUDA test, 18 MB) stands for the
# separate tests.
#
#   bash bench/cuda/prebuilt.sh DIR NAME REV|. TARGET...
#
# builds TARGETs (bench_codec_cache, test_kmeans_device, ...) of REV (in a git worktree under
# /tmp) or of this working tree (.), into DIR/NAME/<target>.gz. DIR must be a folder that
# .git/info/exclude ignores (e.g. devrun); name it in the run's carry and, on the device:
#   gunzip DIR/NAME/*.gz && chmod +x DIR/NAME/* && DIR/NAME/bench_codec_cache OUT.json rabitq 32768
# Several NAMEs (a base and a change) make an A/B whose timings come from one device call.
# The target _core is the Python extension for the device's Python 3.12 (~17 MB gzipped), built
# with PREBUILT_PYTHON (default python3.12 on PATH, e.g. pyenv's), which needs nanobind:
#   python3.12 -m venv /tmp/py312 && /tmp/py312/bin/pip install nanobind
#   PREBUILT_PYTHON=/tmp/py312/bin/python bash bench/cuda/prebuilt.sh devrun py . _core
# and on the device `VQ_PREBUILT=devrun/py bash bench/cuda/run_python_h200.sh` stages it in place
# of its build stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 4 ] || { echo "usage: prebuilt.sh DIR NAME REV|. TARGET..."; exit 1; }
dir=$1 name=$2 rev=$3
shift 3
root=$PWD
if [ "$rev" = . ]; then
  src=$root
  build=$root/build-prebuilt
else
  commit=$(git rev-parse --verify "$rev^{commit}")
  src=/tmp/vq_prebuilt_${commit:0:12}
  git worktree prune  # a worktree whose /tmp folder is gone would block the add
  [ -d "$src" ] || git worktree add -q --detach "$src" "$commit"
  build=$src/build-prebuilt
fi
python=(-DVQ_PYTHON=OFF)
if [[ " $* " == *" _core "* ]]; then
  py=${PREBUILT_PYTHON:-$(command -v python3.12 || true)}
  [ -n "$py" ] && "$py" -c 'import sys, nanobind; assert sys.version_info[:2] == (3, 12)' ||
    { echo "_core needs a Python 3.12 with nanobind (the device's Python): set PREBUILT_PYTHON"; exit 1; }
  python=(-DVQ_PYTHON=ON "-DPython_EXECUTABLE=$py")
  build=$build-py312
fi
mkdir -p "$build"
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90-real \
  "${python[@]}" > "$build/configure.log"
cmake --build "$build" --parallel "$(nproc)" --target "$@" > "$build/build.log" ||
  { tail -30 "$build/build.log"; exit 1; }
mkdir -p "$root/$dir/$name"
for target in "$@"; do
  if [ "$target" = _core ]; then
    binary=$(find "$build/python" -maxdepth 1 -type f -name "_core*.so" | head -1)
  else
    binary=$(find "$build/tests" "$build/bench" -type f -name "$target" -perm -u+x | head -1)
  fi
  [ -n "$binary" ] || { echo "no binary $target in $build"; exit 1; }
  out=$root/$dir/$name/$(basename "$binary")
  strip --strip-unneeded -o "$out" "$binary"
  gzip -f "$out"
done
echo "$name ($rev): $(du -sh "$root/$dir/$name" | cut -f1) in $dir/$name: $*"
