#!/bin/bash
# Stages of a GPU-host session (docs/gpu-host.md: the wheel kit and how a lease runs;
# STAGE names the folder of staged parts for install, default .gpu-stage).
# Usage: bash benchmarks/gpu_host.sh install|check|ray-example|bench|bench-long|bench-tp|capacity
#                                   |place-short|place-512k|place-capacity|fp8|fp8-capacity|spec|spec-steps|serve-load|cpu-attn
#                                   |long-tp4|x4|load-lanes|coattn|coattn-gate|coattn-auto|coattn-overhead|co-spec
#                                   |drift|serve-metrics|serve-killed|noise-floor|upgrade|switch-stack|perf-table
#        bash benchmarks/gpu_host.sh background "STAGE [VAR=VALUE] [STAGE...]"   (returns at once)
#        bash benchmarks/gpu_host.sh wait SECONDS   (until the background stages end)
# Logs and results go to $OUT (or ./gpu-out). A device command may run 10
# minutes; "background" runs longer stage lists into /tmp/gpu-out while
# "wait" calls keep the host busy and bring back what is there so far. Issue
# them back to back: the host is given back 30 s after the last command ends,
# background run or not.
set -uo pipefail
out="${OUT:-$PWD/gpu-out}"; mkdir -p "$out"
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
reinstall() {  # the project as it is now, next to the vLLM stack (once per source state:
  # lanes running side by side must not replace files another one imports)
  local sum; sum=$(cat pyproject.toml $(find vllm_headinfer -name "*.py" | sort) | md5sum | cut -c1-32)
  ( flock 9
    if [ "$(cat /tmp/site/.headinfer-src 2>/dev/null)" != "$sum" ]; then
      python3 -m pip install -q --no-deps --no-index --no-build-isolation --upgrade --target /tmp/site . 2>&1 | grep -vi warning
      rm -rf build; echo "$sum" > /tmp/site/.headinfer-src
    fi ) 9>/tmp/headinfer-reinstall.lock
}
read_pth_files() {  # a --target folder is no site directory: its .pth files
  # (vLLM 0.34's CUTLASS DSL adds its path with one) are read only through this
  printf 'import site\nsite.addsitedir("/tmp/site")\n' > /tmp/site/sitecustomize.py
}
lane() {  # lane GPUS NAME STAGE [VAR=VALUE...]: a stage on some GPUs, in the background
  local gpus=$1 name=$2 stage=$3; shift 3; mkdir -p "$out/$name"
  env CUDA_VISIBLE_DEVICES="$gpus" OUT="$out/$name" "$@" bash "$0" "$stage" > "$out/$name/lane.log" 2>&1 &
}
# Stage settings that co-spec and load-lanes share: the co-attention (CUDA
# graphs) and mtp checks against FLASH_ATTN, and ngram (k = 7) on the edit
# workload at 128K with both backends.
COATTN_MTP_CHECK=("T=tests/gpu/test_cuda_coattention.py tests/gpu/test_cuda_speculative.py"
                  "K=(coattention and cuda-graphs) or mtp" KERNELS=0 CHECK_TIMEOUT=1500)
EDIT_SPEC=(SPEC_CONFIGS=R0,R0+ngram7,FLASH_ATTN,FLASH_ATTN+ngram7 DECODE=96)
accepted_gib() {  # per-rank cpu_kv_gib startup accepts now for $1 ranks, times $2, less $3 GiB
  python3 -c "from vllm_headinfer.host_memory import available_host_bytes as a, host_limit_per_rank as l; print(round(l(a(), $1) / 2**30 * $2 - $3, 2))"
}
case "$1" in
  install)
    # install.sh comes with the last part (carried only by its own command:
    # copy it into /tmp/stage with that part).
    script=$(ls -d "${STAGE:-.gpu-stage}"/c* 2>/dev/null | tail -1)/install.sh
    [ -f "$script" ] || script=/tmp/stage/install.sh
    bash "$script" 2>&1 | tee "$out/install.log"
    read_pth_files
    reinstall
    { nvidia-smi; free -g; nvidia-smi topo -m; lscpu | grep -iE "numa|model name|thread|core|socket";
      echo "cgroup v2 max: $(cat /sys/fs/cgroup/memory.max 2>&1) current: $(cat /sys/fs/cgroup/memory.current 2>&1)";
      echo "cgroup v1 limit: $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>&1)";
      echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>&1)"; ulimit -l; } > "$out/host.txt" 2>&1
    tail -12 "$out/host.txt"
    ;;
  check)
    reinstall
    # Kernels alone, then (RACECHECK=1) under racecheck, then the engines:
    # T = test node ids in the order to run (default: all of tests/gpu).
    [ "${KERNELS:-1}" = 1 ] && timeout 240 python3 tests/gpu/test_kernels.py 2>&1 | tail -20 | tee "$out/kernels.log"
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    if [ "${RACECHECK:-0}" = 1 ] && [ -z "$cs" ]; then
      echo "compute-sanitizer not found" | tee "$out/racecheck.log"
    elif [ "${RACECHECK:-0}" = 1 ]; then
      timeout 240 "$cs" --tool racecheck python3 tests/gpu/test_kernels.py > "$out/racecheck.log" 2>&1
      echo "racecheck exit $?" | tee -a "$out/racecheck.log"; tail -5 "$out/racecheck.log"
    fi
    t="${T:-tests/gpu}"
    # --durations: each test's setup and call times, to see where a slow one's
    # went; SIGINT at the limit lets pytest print them and what passed so far.
    timeout -s INT -k 30 "${CHECK_TIMEOUT:-540}" python3 -m pytest -q -s -rA --durations=0 -p no:cacheprovider ${t//,/ } \
      ${K:+-k "$K"} 2>&1 | tee "$out/pytest_gpu.log" | tail -40
    ;;
  switch-stack)
    # A second vLLM stack in the same lease, so that two versions are timed on
    # one host: its parts (and its install.sh) were copied into /tmp/stage2; the
    # installed stack moves to /tmp/site-first and the second one is installed
    # into an empty /tmp/site. Once both are installed, each call swaps them.
    if [ -d /tmp/stage2 ]; then
      rm -rf /tmp/site-first && mv /tmp/site /tmp/site-first
      rm -rf /tmp/stage && mv /tmp/stage2 /tmp/stage
      bash /tmp/stage/install.sh 2>&1 | tee "$out/install-second.log"
      read_pth_files
    else
      mv /tmp/site /tmp/site-swap && mv /tmp/site-first /tmp/site && mv /tmp/site-swap /tmp/site-first
    fi
    reinstall
    python3 -c "import vllm; print('vllm', vllm.__version__)" | tee -a "$out/stacks.txt"
    ;;
  drift)
    # The version layer's and the patches' tests on this vLLM, and the
    # image's own CUDA wheels (what the staged list can leave out).
    reinstall
    python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" | tee "$out/versions.txt"
    python3 -m pip list 2>/dev/null | grep -iE "^(nvidia|cuda|torch|triton|numpy|numba)" > "$out/image_packages.txt"
    PYTHONPATH= python3 -m pip list 2>/dev/null | grep -iE "^(nvidia|cuda|torch|triton|numpy|numba)" > "$out/image_packages_bare.txt"
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/unit/test_vllm_support.py tests/unit/test_patches.py \
      2>&1 | tee "$out/drift.log" | tail -5
    ;;
  upgrade)
    # One lease on a vLLM version the plugin newly supports (longer than a
    # device command: run in background): the version layer's tests, the
    # kernel checks, exactness against FLASH_ATTN (R = 0 and H, uneven auto
    # placement, co-attention under CUDA graphs, fp8, ngram, a second engine
    # in one process, co-attention failing loudly), vllm serve with /metrics and
    # with its serving thread killed mid-decode,
    # 128K on 32 layers with and without co-attention, and (UPGRADE_CAPACITY=1)
    # the largest pool.
    g=tests/gpu
    bash "$0" drift
    T="$g/test_cuda_exactness.py::test_small_model_tokens_identical[0] $g/test_cuda_exactness.py::test_per_layer_counts[auto] \
$g/test_cuda_coattention.py::test_matches_flash_attn[cuda-graphs-R0-cpuauto] \
$g/test_cuda_coattention.py::test_a_killed_serving_thread_fails_the_engine_within_seconds \
$g/test_cuda_exactness.py::test_fp8_cache[0] $g/test_cuda_exactness.py::test_fp8_cache_with_coattention[cpu2] $g/test_cuda_speculative.py::test_ngram_matches_flash_attn[0] \
$g/test_cuda_exactness.py::test_small_model_tokens_identical[4] \
$g/test_cuda_coattention.py::test_a_second_engine_leaves_nothing_of_the_first ${UPGRADE_EXTRA_CHECKS:-}" \
      CHECK_TIMEOUT=900 bash "$0" check
    bash "$0" serve-metrics
    bash "$0" serve-killed
    SHAPES=32l COATTN_CONFIGS=R0,R0+cpuauto bash "$0" coattn
    [ "${UPGRADE_CAPACITY:-0}" = 1 ] && bash "$0" place-capacity
    ;;
  serve-killed)
    # vllm serve with CPU co-attention's serving thread killed mid-decode.
    reinstall
    timeout 400 python3 tests/gpu/serve_with_killed_coattention.py > "$out/serve_killed.log" 2>&1
    echo "serve_with_killed_coattention exit $?" | tee -a "$out/serve_killed.log"; tail -5 "$out/serve_killed.log"
    ;;
  noise-floor)
    # FLASH_ATTN against itself (eager, other prefill chunks) per KV cache
    # dtype (FLOOR_DTYPES, default auto,fp8): what exactness is judged within.
    reinstall
    timeout 900 python3 benchmarks/noise_floor.py --out "$out/noise_floor.json" \
      ${FLOOR_DTYPES:+--dtypes "$FLOOR_DTYPES"} 2>&1 | grep -E "^FLASH_ATTN|Error" | tee "$out/noise_floor.log"
    ;;
  serve-metrics)
    # vllm serve with HEADINFER: one completion, then /metrics.
    reinstall
    timeout 500 python3 benchmarks/serve_check.py --out "$out" 2>&1 | tail -20
    ;;
  ray-example)
    reinstall
    timeout 400 python3 examples/ray_tp.py --tp "${TP:-1}" > "$out/ray_example.log" 2>&1
    echo "ray_tp.py --tp ${TP:-1} exit $?" | tee -a "$out/ray_example.log"
    grep -E "^prompt|exit" "$out/ray_example.log"
    ;;
  background)
    if [ -e /tmp/gpu-out/RUNNING ] && [ ! -e /tmp/gpu-out/DONE ]; then
      echo "background: a run is still going; use wait"; exit 1
    fi
    rm -rf /tmp/gpu-out; mkdir -p /tmp/gpu-out; touch /tmp/gpu-out/RUNNING
    # A new session: the device host ends a command's other processes.
    # A VAR=value word sets VAR for the stages after it (T takes commas for spaces).
    setsid bash -c 'for stage in $2; do
        case "$stage" in *=*) export "$stage" ;; *) echo "== $(date +%T) $stage"; OUT=/tmp/gpu-out bash "$1" "$stage" ;; esac
      done > /tmp/gpu-out/background.log 2>&1; touch /tmp/gpu-out/DONE' _ "$0" "$2" \
      </dev/null >/dev/null 2>&1 &
    echo "background: $2 (as $(id -un))"
    ;;
  wait)
    end=$((SECONDS + $2))
    while [ ! -e /tmp/gpu-out/DONE ] && [ $SECONDS -lt $end ]; do sleep 5; done
    # One archive: a call brings back at most 8 files, two folders down.
    tar czf "$out/gpu-out.tgz" -C /tmp/gpu-out . ; ls /tmp/gpu-out; tail -15 /tmp/gpu-out/background.log
    ;;
  uva)
    reinstall
    timeout 300 python3 benchmarks/uva_decode_bandwidth.py "$out/uva_bandwidth.json" 2>&1 | tail -4
    ;;
  bench)
    reinstall
    timeout 570 python3 benchmarks/bench_headinfer.py --out "$out/bench_32l.json" \
      --layers 32 --contexts 32768,131072 --configs FLASH_ATTN,R8,R4,R0 --decode-tokens 8 --timeout 240 ${CG:+--cudagraph-mode $CG} 2>&1 | tail -30
    ;;
  bench-long)
    reinstall
    timeout 570 python3 benchmarks/bench_headinfer.py --out "$out/bench_4l.json" \
      --layers 4 --contexts 131072,524288 --configs FLASH_ATTN,R0 --decode-tokens 8 --timeout 300 ${CG:+--cudagraph-mode $CG} 2>&1 | tail -30
    ;;
  bench-tp)
    # Tensor parallel (TP GPUs, default 2; EXECUTOR mp or ray): 512K on the
    # 4-layer shape, then the largest context R0 starts with at a 24 GiB
    # budget per GPU and 90% of the host budget accepted per rank.
    reinstall
    tp="${TP:-2}"; executor="${EXECUTOR:-mp}"
    timeout 400 python3 benchmarks/bench_headinfer.py --out "$out/bench_tp.json" --layers 4 \
      --contexts 524288 --configs FLASH_ATTN,R0 --decode-tokens 8 --timeout 190 \
      --tp "$tp" --executor "$executor" 2>&1 | tail -8
    gib=$(accepted_gib "$tp" 0.9 0)
    timeout 180 python3 benchmarks/bench_headinfer.py --out "$out/capacity_tp.json" --layers 32 \
      --contexts "" --configs R0 --capacity-util 0.3 --capacity-cpu-kv-gib "$gib" --eager \
      --timeout 170 --tp "$tp" --executor "$executor" 2>&1 | tail -3
    ;;
  place-short)
    # Automatic placement where the device holds everything (32 layers, 32K
    # and 128K): every head resident, against FLASH_ATTN in the same run.
    reinstall
    timeout 560 python3 benchmarks/bench_headinfer.py --out "$out/place_short.json" --layers 32 \
      --contexts 32768,131072 --configs FLASH_ATTN,auto --decode-tokens 8 --timeout 270 2>&1 | tail -12
    ;;
  place-512k)
    # One 512K request on 32 layers: the device keeps what it can, the rest
    # of the pool is offloaded (cpu_kv_gib 90 bounds it, the pool needs less).
    reinstall
    timeout 580 python3 benchmarks/bench_headinfer.py --out "$out/place_512k.json" --layers 32 \
      --contexts 524288 --configs auto --cpu-kv-gib 90 --decode-tokens 8 --timeout 570 2>&1 | tail -8
    ;;
  place-capacity)
    # The largest pool at gpu_memory_utilization 0.9 and cpu_kv_gib 90 with
    # --max-model-len auto, then an engine with max_model_len 1,048,576 that
    # generates (CAPACITY_ONLY=1: the largest pool alone; CAPACITY_TAG: a
    # suffix for the result file, one per vLLM stack).
    reinstall
    timeout 290 python3 benchmarks/bench_headinfer.py --out "$out/place_capacity${CAPACITY_TAG:-}.json" --layers 32 \
      --contexts "" --configs auto --capacity-util 0.9 --capacity-cpu-kv-gib 90 --timeout 280 2>&1 | tail -3
    [ "${CAPACITY_ONLY:-0}" = 1 ] || timeout 300 python3 benchmarks/bench_headinfer.py --out "$out/place_1m.json" --layers 32 \
      --contexts 4096 --max-model-len 1048576 --configs auto --cpu-kv-gib 90 --eager \
      --decode-tokens 8 --timeout 290 2>&1 | tail -6
    ;;
  fp8)
    # An fp8 KV cache: 128K on 32 layers, FLASH_ATTN and R0.
    reinstall
    timeout 420 python3 benchmarks/bench_headinfer.py --out "$out/fp8_128k.json" --layers 32 \
      --contexts 131072 --configs FLASH_ATTN,R0 --kv-cache-dtype fp8 --decode-tokens 8 --timeout 200 2>&1 | tail -8
    ;;
  fp8-capacity)
    # The largest fp8 pool at gpu_memory_utilization 0.9 and cpu_kv_gib 90
    # with auto placement (its log has the host pool's allocation and
    # pinning time).
    reinstall
    timeout 290 python3 benchmarks/bench_headinfer.py --out "$out/fp8_capacity.json" --layers 32 \
      --contexts "" --configs auto --kv-cache-dtype fp8 --capacity-util 0.9 --capacity-cpu-kv-gib 90 \
      --timeout 280 2>&1 | tail -3
    grep -h "HEADINFER host pool" "$out"/fp8_capacity.log | tee "$out/pool_allocation.txt"
    ;;
  spec)
    # Prompt-lookup speculative decoding at 128K, 32 layers: R0 and
    # FLASH_ATTN, each with and without ngram (k = 4), on the edit workload
    # (WORKLOAD=cycle for runs 10-12's). A host budget of CPU_KV_GIB (40)
    # per engine leaves room for lanes beside this one.
    reinstall
    timeout 1100 python3 benchmarks/bench_speculative.py --out "$out/spec_128k.json" \
      --configs "${SPEC_CONFIGS:-R0,R0+ngram4,FLASH_ATTN,FLASH_ATTN+ngram4}" \
      --decode-tokens "${DECODE:-64}" --cpu-kv-gib "${CPU_KV_GIB:-40}" --workload "${WORKLOAD:-edit}" \
      --timeout 280 2>&1 | tail -12
    ;;
  spec-steps)
    # Verify steps of k = 1, 3, 7 drafts against decode steps, every head
    # offloaded: 512K on 4 layers, then 128K on 32 layers.
    # SHAPES="4l" or "32l" runs one of the two; STEPS_CONFIGS replaces the
    # configs, DECODE the decode tokens (64).
    reinstall
    configs="${STEPS_CONFIGS:-R0,R0+ngram1,R0+ngram3,R0+ngram7}"
    common=(--configs "$configs" --decode-tokens "${DECODE:-64}" --cpu-kv-gib "${CPU_KV_GIB:-40}" --timeout 260)
    if [[ " ${SHAPES:-4l 32l} " == *" 4l "* ]]; then
      timeout 1100 python3 benchmarks/bench_speculative.py --out "$out/spec_512k_4l.json" --layers 4 \
        --context 524288 "${common[@]}" 2>&1 | tail -10
    fi
    if [[ " ${SHAPES:-4l 32l} " == *" 32l "* ]]; then
      timeout 1100 python3 benchmarks/bench_speculative.py --out "$out/spec_128k_steps.json" \
        "${common[@]}" 2>&1 | tail -10
    fi
    ;;
  long-tp4)
    # The 8B shape (32 layers) at TP = 4 with max_model_len 4,194,304: FLASH_ATTN
    # at that length (refused), then auto placement with a host budget of
    # up to 80 GiB per rank: a 4K prompt, then 1,048,576 tokens prefilled and
    # decoded (longer than a device command: run in background).
    reinstall
    gib=$(python3 -c "print(min(80, $(accepted_gib 4 0.95 0)))")
    { echo "cpu_kv_gib per rank: $gib"; free -g; } | tee "$out/long_tp4_host.txt"
    timeout 300 python3 benchmarks/bench_headinfer.py --out "$out/fa_4m_tp4.json" --layers 32 \
      --contexts 4096 --max-model-len 4194304 --configs FLASH_ATTN --tp 4 --eager \
      --decode-tokens 1 --timeout 290 2>&1 | tail -3
    ( while sleep 20; do echo "$(date +%T) $(free -g | awk '/Mem:/{print "host used GiB", $3}') \
        gpu MiB $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | tr '\n' ' ')"; done \
      ) > "$out/long_tp4_memory.txt" 2>&1 &
    sampler=$!
    timeout 1500 python3 benchmarks/bench_headinfer.py --out "$out/long_tp4.json" --layers 32 \
      --contexts 4096,1048576 --max-model-len 4194304 --configs auto --cpu-kv-gib "$gib" --tp 4 \
      --decode-tokens 8 --timeout 1490 2>&1 | tail -8
    kill $sampler
    ;;
  x4)
    # A four-GPU host: pipeline parallel and ngram on Ray workers (two GPUs
    # each), then the four-GPU checks (TP = 4, TP x PP), then speculative
    # decoding figures on single GPUs side by side: 128K/32 layers verify
    # steps (k = 1, 3, 7) on GPU 2, FLASH_ATTN with and without ngram on
    # GPU 3, 512K/4 layers verify steps (k = 3, 7) on GPU 0.
    reinstall
    lane 0,1 pp check T=tests/gpu/test_cuda_pipeline_parallel.py K="test_pp2 and ray" KERNELS=0
    lane 2,3 ngram-ray check T=tests/gpu/test_cuda_speculative.py K=ray KERNELS=0
    wait
    T="tests/gpu/test_cuda_tensor_parallel.py::test_tp4_8b_shape tests/gpu/test_cuda_pipeline_parallel.py::test_tp2_pp2_ray tests/gpu/test_cuda_tensor_parallel.py::test_tp4_one_kv_head_per_rank[ray]" \
      KERNELS=0 CHECK_TIMEOUT=900 bash "$0" check
    lane 2 steps spec-steps SHAPES=32l DECODE=96
    lane 3 fa spec SPEC_CONFIGS=FLASH_ATTN,FLASH_ATTN+ngram7 DECODE=96
    lane 0 steps-4l spec-steps SHAPES=4l STEPS_CONFIGS=R0,R0+ngram3,R0+ngram7
    wait
    ;;
  co-spec)
    # One GPU, CPU co-attention and speculative decoding (longer than a
    # device command: run in background): co-attention (under CUDA graphs)
    # and mtp against FLASH_ATTN, the kernel's read rate by thread count,
    # co-attention at 512K on 4 layers (run 13 measured 128K and 256K; run
    # "SHAPES='32l 8l' bash $0 coattn" for them with a reworked kernel),
    # ngram (k = 7) on the edit workload at 128K
    # with both backends, then co-attention beside auto placement at 512K.
    env "${COATTN_MTP_CHECK[@]}" bash "$0" check
    bash "$0" cpu-attn
    SHAPES=4l bash "$0" coattn
    env "${EDIT_SPEC[@]}" bash "$0" spec
    bash "$0" coattn-auto
    ;;
  load-lanes)
    # Two or four GPUs side by side (longer than a device command: run in
    # background). The load table in two lanes: FLASH_ATTN then auto on GPU 0
    # (workload (a) compares them on one GPU), R0 on GPU 1; each HEADINFER
    # server has 120 GiB of host pool (90 on two GPUs) and co-attention at
    # most 15 threads (as on the one-GPU host). With four GPUs also:
    # co-attention (CUDA graphs) and mtp against FLASH_ATTN on GPU 2 (7
    # threads), ngram (k = 7) on the edit workload on GPU 3; then
    # co-attention at 512K on 4 layers and the kernel's rate with the host
    # to themselves.
    reinstall
    gpus=$(nvidia-smi -L | wc -l); gib=$([ "$gpus" -ge 4 ] && echo 120 || echo 90)
    lane 0 load-fa serve-load SERVE_CONFIGS=FLASH_ATTN,auto CPU_KV_GIB=$gib VLLM_HEADINFER_CPU_ATTENTION_THREADS=15
    lane 1 load-r0 serve-load SERVE_CONFIGS=R0 CPU_KV_GIB=$gib VLLM_HEADINFER_CPU_ATTENTION_THREADS=15
    if [ "$gpus" -ge 4 ]; then
      lane 2 checks check "${COATTN_MTP_CHECK[@]}" VLLM_HEADINFER_CPU_ATTENTION_THREADS=7
      lane 3 spec spec "${EDIT_SPEC[@]}"
    fi
    wait
    SHAPES=4l bash "$0" coattn
    bash "$0" cpu-attn
    ;;
  serve-load)
    # vllm bench serve against vllm serve: FLASH_ATTN, auto and R0 over the
    # three load workloads (longer than a device command: run in background;
    # SERVE_CONFIGS and WORKLOADS select a part, for a lease too short for
    # all of it).
    reinstall
    timeout 3000 python3 benchmarks/serve_load.py --out "$out/serve_load.json" \
      ${SERVE_CONFIGS:+--configs "$SERVE_CONFIGS"} ${WORKLOADS:+--workloads "$WORKLOADS"} \
      ${CPU_KV_GIB:+--cpu-kv-gib "$CPU_KV_GIB"} 2>&1 | tail -20
    ;;
  coattn)
    # CPU co-attention, every head offloaded: R0 without it and with auto's
    # measured split; 128K on 32 layers, 256K on 8 layers, 512K on 4 layers
    # (SHAPES: some of "32l 8l 4l"; COATTN_CONFIGS: other configurations).
    reinstall
    # How much of host memory is on huge pages and how fragmented the rest is.
    { date +%T; grep -E "MemFree|AnonHugePages|^Shmem:" /proc/meminfo; cat /proc/buddyinfo; } >> "$out/host_memory_state.txt"
    declare -A shape_of=([32l]="131072 240" [8l]="262144 270" [4l]="524288 280")
    for name in ${SHAPES:-32l 8l 4l}; do  # in the order given
      read -r context limit <<< "${shape_of[$name]}"
      timeout 570 python3 benchmarks/bench_headinfer.py --out "$out/coattn_$name${COATTN_TAG:-}.json" \
        --layers "${name%l}" --contexts "$context" --configs "${COATTN_CONFIGS:-R0,R0+cpuauto}" \
        --decode-tokens "${COATTN_DECODE:-40}" --steady-tokens "${COATTN_STEADY:-16}" \
        --timeout "$limit" ${CG:+--cudagraph-mode $CG} ${BLOCK_SIZE:+--block-size $BLOCK_SIZE} 2>&1 | tail -30
    done
    grep -h "HEADINFER CPU co-attention" "$out"/coattn_*.log | sort | uniq -c | tee "$out/coattn_split.txt"
    ;;
  perf-table)
    # One decode table with both physical limits measured in the same run
    # (docs/performance.md): 128K on 32 layers, FLASH_ATTN, every head
    # offloaded over the link alone (R0) and with co-attention auto, in bf16
    # and fp8; then ngram (k = 7) at R0 on the edit workload. First 16 decode
    # tokens after prefill and the last 16 alone; PERF_PARTS: some of
    # "bf16 fp8 spec" (about 8, 7 and 6 minutes).
    reinstall
    parts=" ${PERF_PARTS:-bf16 fp8 spec} "
    timed=(--layers 32 --contexts 131072 --configs FLASH_ATTN,R0,R0+cpuauto --decode-tokens 40
           --steady-tokens 16 --both-readers --timeout 270)
    [[ $parts == *" bf16 "* ]] && timeout 900 python3 benchmarks/bench_headinfer.py \
      --out "$out/perf_bf16.json" "${timed[@]}" 2>&1 | tail -16
    [[ $parts == *" fp8 "* ]] && timeout 900 python3 benchmarks/bench_headinfer.py \
      --out "$out/perf_fp8.json" --kv-cache-dtype fp8 "${timed[@]}" 2>&1 | tail -16
    [[ $parts == *" spec "* ]] && timeout 700 python3 benchmarks/bench_speculative.py \
      --out "$out/perf_spec.json" --configs R0,R0+ngram7 --decode-tokens 96 --timeout 330 2>&1 | tail -8
    reports=$(ls "$out"/perf_bf16.json "$out"/perf_fp8.json 2>/dev/null)
    [ -n "$reports" ] && python3 benchmarks/perf_table.py $reports \
      $([ -f "$out/perf_spec.json" ] && echo --spec "$out/perf_spec.json") | tee "$out/perf_table.md"
    ;;
  coattn-gate)
    # The per-step gate and what piecewise graphs cost, every head offloaded,
    # 32 layers, 4K and 32K: R0 without co-attention (full graphs), with
    # auto (under the gate's threshold a step makes the same reads between
    # piecewise graphs), and without it under piecewise graphs only
    # (GATE_CONTEXTS: other contexts).
    reinstall
    contexts=${GATE_CONTEXTS:-4096,32768}
    timeout 400 python3 benchmarks/bench_headinfer.py --out "$out/coattn_gate.json" --layers 32 \
      --contexts "$contexts" --configs R0,R0+cpuauto --decode-tokens 32 --timeout 190 2>&1 | tail -12
    timeout 250 python3 benchmarks/bench_headinfer.py --out "$out/coattn_gate_piecewise.json" --layers 32 \
      --contexts "$contexts" --configs R0 --decode-tokens 32 --timeout 240 --cudagraph-mode PIECEWISE 2>&1 | tail -6
    ;;
  coattn-overhead)
    # What a co-attending layer adds besides the kernel (the handshake with
    # the serving thread), alone: the cpu-attn stage's last part.
    reinstall
    timeout 240 python3 benchmarks/coattention_overhead.py --out "$out/coattn_overhead.json" 2>&1 | tail -6
    ;;
  coattn-auto)
    # Co-attention beside automatic placement: one 512K request on 32 layers
    # (the device keeps what it can, as in place-512k), without and with
    # auto's split of the offloaded heads (AUTO_CONFIGS: one of them).
    reinstall
    timeout 700 python3 benchmarks/bench_headinfer.py --out "$out/coattn_auto_512k.json" --layers 32 \
      --contexts 524288 --configs "${AUTO_CONFIGS:-auto,auto+cpuauto}" --cpu-kv-gib 90 --decode-tokens 8 --timeout 290 2>&1 | tail -8
    ;;
  cpu-attn)
    # The CPU decode-attention kernel's K/V read rate by thread count, alone
    # and with the link busy, over 1, 2, 4 and 8 heads (auto placement
    # leaves layers 1 or 2 offloaded heads); auto's startup measurement
    # (both readers at once, all cores but one); what a co-attending layer
    # adds besides the kernel (HEADS, THREADS: a part of the table), by the
    # OpenMP wait policy too.
    reinstall
    timeout 300 python3 benchmarks/cpu_attention_bandwidth.py --out "$out/cpu_attn_bw.json" \
      --heads "${HEADS:-1,2,4,8}" ${THREADS:+--threads "$THREADS"} 2>&1 | tail -40
    timeout 120 python3 -c "import os, torch; from vllm_headinfer.coattention.probe import measure_rates as m
t = len(os.sched_getaffinity(0)) - 1
for _ in range(3): print('probe threads', t, 'CPU, GPU GB/s:', [round(r / 1e9, 1) for r in m(t, torch.bfloat16, None, 128, 16)])" \
      2>&1 | tail -4 | tee "$out/coattn_probe.txt"
    timeout 200 python3 benchmarks/coattention_overhead.py --out "$out/coattn_overhead.json" 2>&1 | tail -6
    OMP_WAIT_POLICY=ACTIVE timeout 100 python3 benchmarks/coattention_overhead.py \
      --out "$out/coattn_overhead_active.json" 2>&1 | tail -3
    ;;
  capacity)
    # R0 at the largest budget HEADINFER accepts at startup on this host; if
    # that start fails, again at 90 GiB.
    reinstall
    gib=$(accepted_gib 1 1 0.05)
    echo "accepted budget: $gib GiB" | tee "$out/capacity_budget.txt"
    timeout 280 python3 benchmarks/bench_headinfer.py --out "$out/capacity.json" --layers 32 --contexts "" \
      --configs R0 --capacity-util 0.3 --capacity-cpu-kv-gib "$gib" --eager --timeout 250 2>&1 | tail -3
    if ! grep -q '"ok": true' "$out/capacity.json"; then
      timeout 250 python3 benchmarks/bench_headinfer.py --out "$out/capacity90.json" --layers 32 --contexts "" \
        --configs R0 --capacity-util 0.3 --capacity-cpu-kv-gib 90 --eager --timeout 230 2>&1 | tail -3
    fi
    dmesg 2>/dev/null | grep -iE "oom|killed process" | tail -5 | tee -a "$out/capacity_budget.txt"
    ;;
esac
