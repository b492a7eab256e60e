#!/usr/bin/env bash
# Builds the CPU library and its GoogleTest suite with AddressSanitizer (leaks included) and
# UndefinedBehaviorSanitizer in build-asan/ (g++, RelWithDebInfo, no CUDA) and runs the suite and
# the fuzz corpus replays there; any report fails the run. About 25 minutes on 2 cores, so CI does
# not run it: run it after changing parsers, packing or kernels.
#   bash scripts/sanitize.sh [GTEST_FILTER]
# The allocation-failure tests run too: every failed call must also free what it took. (The
# allocation-counter tests interpose malloc, which the sanitizers own: they are left out.)
set -euo pipefail
cd "$(dirname "$0")/.."
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVQ_CUDA=OFF \
  -DVQ_BUILD_BENCH=OFF -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags" >/dev/null
cmake --build build-asan --parallel "$(nproc)" --target veloxquant_tests \
  veloxquant_alloc_failure_tests make_fuzz_seeds fuzz_cache fuzz_calibration fuzz_gguf \
  fuzz_tokenizer fuzz_cache_ops
export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1
build-asan/tests/veloxquant_tests --gtest_brief=1 --gtest_filter="${1:-*}"
build-asan/tests/veloxquant_alloc_failure_tests --gtest_brief=1 --gtest_filter="${1:-*}"
ctest --test-dir build-asan -R '^fuzz_' --output-on-failure
