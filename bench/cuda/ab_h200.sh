#!/usr/bin/env bash
# A/B of changes on the H200 in one device run: this tree ("new") against one or more variants,
# each this tree with some files replaced, all built side by side, the tests run on the builds
# asked for, then one benchmark command alternated between the builds. Every step's full output
# lands in a file under $OUT/ab, packed into $OUT/ab.tgz at the end (the device tool returns only
# a console tail and a few files); the console gets one summary line a step.
#
# A variant is a folder of replacement files that travels with the run (the device gets no
# .git). Here, before the run:
#   bash bench/cuda/ab_h200.sh --base-files REV DIR   # DIR/<path> = REV's version of every
#                                                   # file that differs from REV (against the
#                                                   # working tree; a new file counts once git
#                                                   # knows it: commit it or `git add -N`)
#   bash bench/cuda/ab_h200.sh --snapshot DIR FILE... # DIR/<FILE> = this tree's FILE now (to
#                                                   # keep one try while editing the next)
#   bash bench/cuda/ab_h200.sh --patch DIR PATCH     # DIR/<path> = this tree's files with the
#                                                   # patch applied (e.g. bench/cuda/*.patch)
# Then on the device (carry the folders, e.g. devrun/):
#   AB_BASE="base=devrun/base try1=devrun/try1" \
#   AB_TARGETS="test_cuda_codec_cache bench_codec_cache" \
#   AB_TESTS="tests/cuda/test_cuda_codec_cache" AB_TEST_VARIANTS="new try1" \
#   AB_BENCH='bench/cuda/bench_codec_cache {out}.json rabitq_b3_v4 32768' \
#   AB_ROUNDS=3 bash bench/cuda/ab_h200.sh
# AB_BASE: `name=folder` items (a bare folder is named "base"). The variants build AB_TARGETS'
# bench_* targets, and all of AB_TARGETS where AB_TEST_VARIANTS names them ("new" by default);
# AB_TESTS are paths in a build, each run under a timeout (AB_TEST_TIMEOUT, 150 s) in every
# build AB_TEST_VARIANTS names. AB_BENCH, a shell command line (environment settings, pipes and
# `;` work: it runs under bash -c), is run from each build folder, {out} replaced by
# $OUT/ab/bench_<variant>_<round> and {root} by this repository's root (for its scripts:
# `bash {root}/bench/cuda/points.sh {out}`); AB_GREP (a regular expression) picks the lines echoed.
# AB_CMAKE_ARGS adds configure options to every build (e.g. "-DVQ_PYTHON=ON
# -DPython_EXECUTABLE=$(command -v python3)" to build the extension's _core beside the tests).
set -uo pipefail
cd "$(dirname "$0")/../.."

case "${1:-}" in
--base-files)
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
  ;;
--patch)
  dir=${2:?usage: ab_h200.sh --patch DIR PATCH} patch=${3:?usage: ab_h200.sh --patch DIR PATCH}
  files=$(git apply --numstat "$patch" | cut -f3) || exit 1
  rm -rf "$dir" && mkdir -p "$dir"
  for f in $files; do  # the files the patch changes; those it adds, git apply makes
    mkdir -p "$dir/$(dirname "$f")"
    [ -f "$f" ] && cp "$f" "$dir/$f"
  done
  git apply --unsafe-paths --directory="$dir" "$patch" || exit 1
  echo "$(echo "$files" | wc -w) files of this tree with $patch in $dir"
  exit 0
  ;;
--snapshot)
  dir=${2:?usage: ab_h200.sh --snapshot DIR FILE...}
  shift 2
  [ $# -gt 0 ] || { echo "usage: ab_h200.sh --snapshot DIR FILE..."; exit 1; }
  for f in "$@"; do
    [ -f "$f" ] || { echo "no such file: $f"; exit 1; }
    mkdir -p "$dir/$(dirname "$f")"
    cp "$f" "$dir/$f"
  done
  echo "$# files of this tree in $dir"
  exit 0
  ;;
esac

: "${OUT:?OUT must name the output folder}"
: "${AB_BASE:?AB_BASE must name the variant folders (name=folder; ab_h200.sh --base-files)}"
: "${AB_TARGETS:?AB_TARGETS must name the build targets}"
test_variants=${AB_TEST_VARIANTS:-new}
bench_targets=$(for t in $AB_TARGETS; do case $t in bench_*) echo "$t" ;; esac; done)
if [ -n "${AB_BENCH:-}" ] && [ -z "$bench_targets" ]; then
  echo "AB_BENCH is set but AB_TARGETS names no bench_* target to build for the variants"
  exit 1
fi
R=$OUT/ab
mkdir -p "$R"
step() { echo "== $(date -u +%T) $*"; }
names="new" folders=""
for item in $AB_BASE; do
  case $item in *=*) name=${item%%=*} folder=${item#*=} ;; *) name=base folder=$item ;; esac
  [ -d "$folder" ] || { echo "no variant folder $folder"; exit 1; }
  case " $names " in *" $name "*) echo "variant $name named twice"; exit 1 ;; esac
  names="$names $name"
  folders="$folders $folder"
done
count=$(echo $names | wc -w)
jobs=$(( $(nproc) / count > 0 ? $(nproc) / count : 1 ))
build_dir() { [ "$1" = new ] && echo build_ab_new || echo "/tmp/ab_$1/build"; }
wants_tests() { case " $test_variants " in *" $1 "*) return 0 ;; esac; return 1; }

step "variants: $names (each this tree with its folder's files)"
set -- $folders
for name in $names; do
  [ "$name" = new ] && continue
  folder=$1
  shift
  src=/tmp/ab_$name
  rm -rf "$src" && mkdir -p "$src"
  cp -r CMakeLists.txt src include bench tests tools python scripts pyproject.toml "$src"/ 2>/dev/null
  (cd "$folder" && find . -type f ! -name .added) | while read -r f; do
    mkdir -p "$src/$(dirname "$f")"
    cp "$folder/$f" "$src/$f"
  done
  if [ -f "$folder/.added" ]; then
    while read -r f; do rm -f "$src/$f"; done < "$folder/.added"
  fi
done

step "configure and build ($AB_TARGETS; $jobs jobs each)"
pids=""
for name in $names; do
  src=. && [ "$name" != new ] && src=/tmp/ab_$name
  targets=$bench_targets
  wants_tests "$name" && targets=$AB_TARGETS
  [ -n "$targets" ] || continue
  (cmake -S "$src" -B "$(build_dir "$name")" -G Ninja -DCMAKE_BUILD_TYPE=Release -DVQ_CUDA=ON \
     -DCMAKE_CUDA_ARCHITECTURES=90 -DVQ_BUILD_TESTS=ON -DVQ_BUILD_BENCH=ON -DVQ_BUILD_TOOLS=OFF \
     ${AB_CMAKE_ARGS:-} > "$R/configure_$name.log" 2>&1 &&
   cmake --build "$(build_dir "$name")" -j "$jobs" --target $targets > "$R/build_$name.log" 2>&1
   echo "build $name: exit $? ($(grep -c "spilled" "$R/build_$name.log") kernels spill;" \
     "ab/build_$name.log)"
   grep -E "error" "$R/build_$name.log" | head -10) &
  pids="$pids $!"
done
for p in $pids; do wait "$p"; done

for name in $names; do
  wants_tests "$name" || continue
  for t in ${AB_TESTS:-}; do
    log=$R/test_${name}_$(basename "$t").log
    timeout "${AB_TEST_TIMEOUT:-150}" "$(build_dir "$name")/$t" > "$log" 2>&1
    echo "test $name $(basename "$t"): exit $? $(grep -E "^\[  (PASSED|FAILED) " "$log" | tr '\n' ' ')" \
      "(ab/$(basename "$log"))"
    grep -E "^\[  FAILED  \]" "$log" | head -10
  done
done

if [ -n "${AB_BENCH:-}" ]; then
  step "bench, alternated ${AB_ROUNDS:-2} times: $AB_BENCH"
  for r in $(seq 1 "${AB_ROUNDS:-2}"); do
    for name in $names; do
      cmd=${AB_BENCH//\{out\}/$R/bench_${name}_$r}
      cmd=${cmd//\{root\}/$PWD}
      (cd "$(build_dir "$name")" && timeout 300 bash -c "$cmd") > "$R/bench_${name}_$r.txt" 2>&1
      grep -E "${AB_GREP:-encode|decode|ms}|error" "$R/bench_${name}_$r.txt" | head -12 |
        sed "s/^/$name $r: /"
    done
  done
fi

(cd "$OUT" && tar czf ab.tgz ab && rm -rf ab)
step "done: $OUT/ab.tgz"
