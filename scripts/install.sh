#!/usr/bin/env bash
# Install qig into ./.venv (created if missing).
#
# torch: if the venv already has a torch (e.g. a CUDA build you installed
# first, as the README says for GPU machines), it is kept. Otherwise the CPU
# build torch==2.13.0 is installed (on CI/dev machines it lies on local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[dev,plot,export,lmms-eval]"
# lmms-eval itself without its dependency list: it requires torchvision, which has no build for the CPU torch
# (docs/lmms-eval.md); the lmms-eval extra above holds what it needs to run `--model qig`
.venv/bin/pip install -q --no-deps lmms-eval==0.7.3
