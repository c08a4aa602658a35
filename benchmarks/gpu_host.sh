#!/bin/bash
# Stages of a GPU-host session (see ../shared/gpu/README.md for the wheel kit).
# Usage: bash benchmarks/gpu_host.sh install|check|bench|bench-long|capacity
# Logs and results go to $OUT (or ./gpu-out).
set -uo pipefail
out="${OUT:-$PWD/gpu-out}"; mkdir -p "$out"
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
reinstall() {  # the project as it is now, next to the vLLM stack
  python3 -m pip install -q --no-deps --no-index --no-build-isolation --upgrade --target /tmp/site . 2>&1 | grep -vi warning
  rm -rf build
}
case "$1" in
  install)
    last=$(ls -d .gpu-stage/c* | tail -1)
    bash "$last/install.sh" 2>&1 | tee "$out/install.log"
    reinstall
    nvidia-smi | tee "$out/nvidia-smi.txt"; free -g | tee -a "$out/nvidia-smi.txt"
    ;;
  check)
    reinstall
    # Kernels alone, then under racecheck (small case), then the engines.
    timeout 120 python3 tests/gpu/test_kernels.py 2>&1 | tail -20 | tee "$out/kernels.log"
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    if [ -n "$cs" ]; then
      timeout 240 "$cs" --tool racecheck python3 tests/gpu/test_kernels.py > "$out/racecheck.log" 2>&1
      echo "racecheck exit $?" | tee -a "$out/racecheck.log"; tail -5 "$out/racecheck.log"
    else
      echo "compute-sanitizer not found" | tee "$out/racecheck.log"
    fi
    timeout 420 python3 -m pytest -x -q -s tests/gpu -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log" | tail -30
    ;;
  bench)
    reinstall
    timeout 570 python3 benchmarks/bench_headinfer.py --out "$out/bench_32l.json" \
      --layers 32 --contexts 32768,131072 --configs FLASH_ATTN,R8,R4,R0 --decode-tokens 8 --timeout 240 2>&1 | tail -30
    ;;
  bench-long)
    reinstall
    timeout 570 python3 benchmarks/bench_headinfer.py --out "$out/bench_4l.json" \
      --layers 4 --contexts 131072,524288 --configs FLASH_ATTN,R0,R4 --decode-tokens 8 --timeout 300 2>&1 | tail -30
    ;;
  capacity)
    reinstall
    free_gib=$(python3 -c "import psutil; print(round(psutil.virtual_memory().available/2**30*0.85, 1))")
    timeout 570 python3 benchmarks/bench_headinfer.py --out "$out/capacity.json" --layers 32 --contexts "" \
      --configs FLASH_ATTN,R4,R0 --capacity-util 0.3 --capacity-cpu-kv-gib "$free_gib" --decode-tokens 1 --eager --timeout 240 2>&1 | tail -20
    ;;
esac
