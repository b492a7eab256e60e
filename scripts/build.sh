#!/usr/bin/env bash
# Configures and builds VeloxQuant (Release) into build/. CUDA is built when nvcc is found.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build --parallel "$(nproc)"
