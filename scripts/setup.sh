#!/usr/bin/env bash
# One command for a fresh Debian 12 machine: install dependencies and the default model,
# build, and run the main job (synthetic table, then compare --quick on SmolLM2-135M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation .
./build/tools/veloxquant/veloxquant synthetic --json build/synthetic_latest.json
# The main job on the default model, at smoke-test size (a full `compare` takes hours on 2 cores).
./build/tools/veloxquant/veloxquant compare --quick --json build/compare_quick.json --plot build/compare_quick.png
