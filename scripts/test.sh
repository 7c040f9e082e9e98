#!/usr/bin/env bash
# Sets itself up (scripts/setup.sh) and runs the whole test suite on two xdist workers (RAYBENCH_TEST_WORKERS=0
# runs it in this one process). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${RAYBENCH_TEST_WORKERS:-2}" --dist loadgroup "$@"
