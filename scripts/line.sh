#!/usr/bin/env bash
# Set up (first run only) and run the whole inspection line on the shipped sample boards.
# Extra arguments go to `sdrm line`, for example --devices 4 or --source DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sdrm line "$@"
