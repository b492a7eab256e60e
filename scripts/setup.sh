#!/usr/bin/env bash
# One command for a fresh Debian 12 machine: install dependencies and the default model,
# build, and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation .
./build/tools/veloxquant/veloxquant synthetic --json bench/results/synthetic_latest.json
