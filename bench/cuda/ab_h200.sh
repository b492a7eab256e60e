#!/usr/bin/env bash
# A/B of a change on the H200 in one device run: this tree ("new") against a base made of this
# tree with some files replaced ("base"), both built side by side, the new tree's tests run, then
# one benchmark command alternated between the two builds. Every step's full output lands in a
# file under $OUT/ab, packed into $OUT/ab.tgz at the end (the device tool returns only a
# console tail and a few files); the console gets one summary line a step.
#
# The base is the files a base revision has where this tree differs, under a folder that travels
# with the run (the device gets no .git). Here, before the run:
#   bash bench/cuda/ab_h200.sh --base-files REV DIR   # writes DIR/<path> = REV's version of
#                                                   # every file that differs from REV
# (against the working tree; a new file counts once git knows it: commit it or `git add -N`).
# Then on the device (carry DIR, e.g. devrun/base):
#   AB_BASE=devrun/base AB_TARGETS="test_cuda_codec_cache bench_codec_cache" \
#   AB_TESTS="tests/cuda/test_cuda_codec_cache" \
#   AB_BENCH='bench/cuda/bench_codec_cache {out}.json rabitq_b3_v4 32768' \
#   AB_ROUNDS=3 bash bench/cuda/ab_h200.sh
# AB_BENCH is run from each build folder, {out} replaced by $OUT/ab/bench_<variant>_<round>;
# AB_TESTS are paths in the new build, each run under a timeout (AB_TEST_TIMEOUT, 150 s);
# AB_GREP (a regular expression) picks the bench lines echoed to the console.
set -uo pipefail
cd "$(dirname "$0")/../.."

if [ "${1:-}" = "--base-files" ]; then
  rev=${2:?usage: ab_h200.sh --base-files REV DIR} dir=${3:?usage: ab_h200.sh --base-files REV DIR}
  rm -rf "$dir" && mkdir -p "$dir"
  git diff --name-only --diff-filter=MD "$rev" -- src include tests bench CMakeLists.txt \
    ':!bench/results' |
    while read -r f; do
      mkdir -p "$dir/$(dirname "$f")"
      git show "$rev:$f" > "$dir/$f"
    done
  git diff --name-only --diff-filter=A "$rev" -- src include tests bench CMakeLists.txt ':!bench/results' \
    > "$dir/.added"  # files the base lacks: removed from its tree
  echo "base files of $rev in $dir: $(find "$dir" -type f ! -name .added | wc -l) replaced," \
    "$(wc -l < "$dir/.added") removed"
  exit 0
fi

: "${OUT:?OUT must name the output folder}"
: "${AB_BASE:?AB_BASE must name the folder of base files (ab_h200.sh --base-files)}"
: "${AB_TARGETS:?AB_TARGETS must name the build targets}"
# The base builds only the benchmarks (AB_TARGETS' bench_* ones): its tests are not run.
base_targets=$(for t in $AB_TARGETS; do case $t in bench_*) echo "$t" ;; esac; done)
if [ -n "${AB_BENCH:-}" ] && [ -z "$base_targets" ]; then
  echo "AB_BENCH is set but AB_TARGETS names no bench_* target to build for the base"
  exit 1
fi
R=$OUT/ab
mkdir -p "$R"
step() { echo "== $(date -u +%T) $*"; }
jobs=$(nproc)
configure() {  # source folder, build folder, log name
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DVQ_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DVQ_BUILD_TESTS=ON -DVQ_BUILD_BENCH=ON -DVQ_BUILD_TOOLS=OFF \
    > "$R/configure_$3.log" 2>&1 || { tail -20 "$R/configure_$3.log"; exit 1; }
}

step "base tree: this tree with $AB_BASE's files"
base_src=/tmp/ab_base
rm -rf "$base_src" && mkdir -p "$base_src"
cp -r CMakeLists.txt src include bench tests tools python scripts pyproject.toml "$base_src"/ 2>/dev/null
(cd "$AB_BASE" && find . -type f ! -name .added) | while read -r f; do
  cp "$AB_BASE/$f" "$base_src/$f"
done
if [ -f "$AB_BASE/.added" ]; then
  while read -r f; do rm -f "$base_src/$f"; done < "$AB_BASE/.added"
fi

step "configure and build ($AB_TARGETS)"
configure . build_ab_new new
configure "$base_src" "$base_src/build" base
: > "$R/build_base.log"
base_build=""
if [ -n "$base_targets" ]; then
  cmake --build "$base_src/build" -j $((jobs / 2)) --target $base_targets > "$R/build_base.log" 2>&1 &
  base_build=$!
fi
cmake --build build_ab_new -j $((jobs / 2)) --target $AB_TARGETS > "$R/build_new.log" 2>&1 ||
  { grep -E "error" "$R/build_new.log" | head -20; }
if [ -n "$base_build" ]; then wait "$base_build" || grep -E "error" "$R/build_base.log" | head -20; fi
for v in new base; do echo "$v: $(grep -c "spilled" "$R/build_$v.log") kernels spill (ab/build_$v.log)"; done

for t in ${AB_TESTS:-}; do
  name=$(basename "$t")
  step "test $name (full output: ab/test_$name.log)"
  timeout "${AB_TEST_TIMEOUT:-150}" "build_ab_new/$t" > "$R/test_$name.log" 2>&1
  echo "exit $? $(grep -E "^\[  (PASSED|FAILED) " "$R/test_$name.log" | tr '\n' ' ')"
  grep -E "^\[  FAILED  \]" "$R/test_$name.log" | head -10
done

if [ -n "${AB_BENCH:-}" ]; then
  step "bench, alternated ${AB_ROUNDS:-2} times: $AB_BENCH"
  for r in $(seq 1 "${AB_ROUNDS:-2}"); do
    for v in base new; do
      dir=build_ab_new
      [ $v = base ] && dir=$base_src/build
      cmd=${AB_BENCH//\{out\}/$R/bench_${v}_$r}
      (cd "$dir" && timeout 300 $cmd) > "$R/bench_${v}_$r.txt" 2>&1
      grep -E "${AB_GREP:-encode|decode|ms}|error" "$R/bench_${v}_$r.txt" | head -12 | sed "s/^/$v $r: /"
    done
  done
fi

(cd "$OUT" && tar czf ab.tgz ab && rm -rf ab)
step "done: $OUT/ab.tgz"
