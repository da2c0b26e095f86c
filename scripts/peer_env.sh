#!/usr/bin/env bash
# The side environment of benchmarks/vs_llmcompressor.py: llm-compressor, pinned, in its own virtualenv
# (.venv-peer, gitignored by .venv-*/). The project's .venv never imports llmcompressor; the benchmark runs the
# peer's side as a subprocess of this venv's python.
#
# torch is installed first and pinned (torch==2.13.0, the CPU build that lies on local disk on the project's
# machines; on a GPU machine install the build for your hardware first, as for .venv): llmcompressor's own
# requirement would otherwise let pip fetch another torch. torchvision is not installed: the registry's build does
# not match the CPU torch and would break transformers' image processors (docs/lmms-eval.md says the same).
#
#   bash scripts/peer_env.sh                  # creates or updates .venv-peer
#   QIG_PEER_VENV=/tmp/peer bash scripts/peer_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PEER="${QIG_PEER_VENV:-.venv-peer}"
LLMCOMPRESSOR="llmcompressor==0.14.0.1"
[ -x "$PEER/bin/python" ] || "$PY" -m venv "$PEER"
if ! "$PEER/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$PEER/bin/pip" install -q torch==2.13.0
fi
"$PEER/bin/pip" install -q "$LLMCOMPRESSOR"
if "$PEER/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    echo "warning: $PEER has torchvision (a dependency pulled it in); if the processor fails to load, pip uninstall it" >&2
fi
"$PEER/bin/python" -c "import llmcompressor, compressed_tensors, transformers, torch; print('peer env:', 'llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
