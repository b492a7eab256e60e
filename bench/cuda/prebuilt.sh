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
  [ -d "$src" ] || git worktree add -q --detach "$src" "$commit"
  build=$src/build-prebuilt
fi
mkdir -p "$build"
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90-real \
  -DVQ_PYTHON=OFF > "$build/configure.log"
cmake --build "$build" --parallel "$(nproc)" --target "$@" > "$build/build.log" ||
  { tail -30 "$build/build.log"; exit 1; }
mkdir -p "$root/$dir/$name"
for target in "$@"; do
  binary=$(find "$build/tests" "$build/bench" -type f -name "$target" -perm -u+x | head -1)
  [ -n "$binary" ] || { echo "no binary $target in $build"; exit 1; }
  strip -o "$root/$dir/$name/$target" "$binary"
  gzip -f "$root/$dir/$name/$target"
done
echo "$name ($rev): $(du -sh "$root/$dir/$name" | cut -f1) in $dir/$name: $*"
