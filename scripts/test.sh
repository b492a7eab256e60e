#!/usr/bin/env bash
# Builds and runs every test: the GoogleTest suites through ctest, then the Python oracles
# (gguf and tokenizers packages, numpy references) through pytest. Model tests run when
# models/ holds the default model (scripts/install_deps.sh fetches it) and skip otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then echo "no .venv: run bash scripts/setup.sh (or scripts/install_deps.sh) first" >&2; exit 1; fi
bash scripts/build.sh
# The Python package (C++ core + nanobind extension), built incrementally in build-python/.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation .
ctest --test-dir build --output-on-failure --timeout 900 -j "$(nproc)"
export VQ_GGUF_DUMP="$PWD/build/tools/gguf_dump/gguf_dump"
export VQ_LOGITS_DUMP="$PWD/build/tools/logits_dump/logits_dump"
export VQ_CLI="$PWD/build/tools/veloxquant/veloxquant"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider tests/python python/tests
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, not a pass.
if [ "$rc" -ne 0 ]; then echo "pytest failed (exit $rc)"; exit "$rc"; fi
