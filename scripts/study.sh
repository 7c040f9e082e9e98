#!/usr/bin/env bash
# Sets itself up (scripts/setup.sh) and runs the study's main job: `python -m raybench.grid` on its
# built-in default. Extra arguments go to raybench.grid (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m raybench.grid "$@"
