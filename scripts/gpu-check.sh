#!/usr/bin/env bash
# The first run on a GPU machine: sets itself up (scripts/setup.sh, plus nvidia-ml-py for the GPU's busy
# fraction), then checks and measures raybench on the GPU (python -m raybench.gpucheck): the cuda tests, the
# bench, one epoch of each seed trial, the smoke grid on one GPU. About 8 minutes on one H100/H200, --quick
# about 3; extra arguments go to raybench.gpucheck (see --help). The report's path is the last line printed.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
# NVML reads the GPU's busy fraction; without it the check falls back to nvidia-smi, so a failed install
# (no package index reachable, say) is a warning, not the end.
if ! .venv/bin/python -c "import pynvml" 2>/dev/null; then
  .venv/bin/python -m pip install -q -c .venv/torch-constraints.txt nvidia-ml-py >&2 \
    || echo "[gpu-check] warning: nvidia-ml-py did not install; GPU busy fraction from nvidia-smi if present" >&2
fi
exec .venv/bin/python -m raybench.gpucheck --setup-s "$((SECONDS - start))" "$@"
