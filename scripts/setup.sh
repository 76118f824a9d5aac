#!/usr/bin/env bash
# Create .venv and install SDRM Line with its test, bench and broker extras (idempotent).
#
# torch is pinned to 2.13.0 first: on machines with a local CPU wheel of that version pip takes it
# from disk, and a CPU build avoids downloading several GB of CUDA libraries. Set SDRM_TORCH to
# another requirement (for example "torch" on a Jetson with NVIDIA's wheel) to change that.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi

stamp=.venv/.sdrm-installed
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "${SDRM_TORCH:-torch==2.13.0}"
  .venv/bin/python -m pip install --quiet -e ".[test,bench,broker]"
  touch "$stamp"
fi
