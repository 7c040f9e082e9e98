#!/usr/bin/env bash
# Creates .venv and installs raybench with its test extras. Idempotent: does nothing when the install
# stamp matches pyproject.toml. torch/torchvision are pinned so pip never replaces them with a newer
# multi-GB build; override with TORCH_SPEC="torch==X torchvision==Y" for another CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
stamp=.venv/.raybench-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "[setup] installing $TORCH_SPEC (pinned) ..." >&2
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC 2>&1 | grep -v "is ignored" >&2 || true
echo "[setup] installing raybench and its dependencies ..." >&2
# The pinned torch stays: the constraint file stops pip from "upgrading" it through a dependency.
printf '%s\n' $TORCH_SPEC > .venv/torch-constraints.txt
.venv/bin/python -m pip install -q -c .venv/torch-constraints.txt -e ".[test]" 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -c "import torch, torchvision, ray, transformers, raybench" \
  || { echo "[setup] install failed: see pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
