"""HEADINFER vs FLASH_ATTN on a Llama-3-8B-shaped model with dummy weights.

One command on a CUDA host with vLLM 0.32.0 and this plugin installed:

    python benchmarks/bench_headinfer.py --out results.json

For each configuration (FLASH_ATTN; HEADINFER with R resident KV heads of 8
in every layer, "R4"; HEADINFER with automatic placement, "auto", whose pool
is one request of max_model_len; either with CPU co-attention of n offloaded
heads per layer, "R0+cpu3", or auto's split, "R0+cpuauto") one engine is started in its own process (GPU memory is fully released in
between) and, for every context length it can hold, one prompt of that many
random tokens is prefilled and then decoded. Timings come from vLLM's own
per-request timestamps (scheduled -> first token -> last token), so they
exclude engine start-up and the frontend. Link bandwidth is the offloaded KV
bytes one decode step reads (from the placement line) divided by the step
time. A separate start-up at
``--capacity-util`` (0.3 of an 80 GB card = a 24 GiB budget) with
``max_model_len=auto`` reports the largest context each configuration admits.

With ``--tp T`` every engine is tensor parallel over T GPUs (``--executor ray``
or the default mp executor): ``R`` then counts resident KV heads per rank (of
8 / T), host KV figures are per rank, and the link figure is the bytes all
ranks read per step over the step time, next to the H2D rate of one GPU
times T (each GPU reads over its own link).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from vllm_headinfer import model_shapes
from vllm_headinfer.plan import measure_link_gbps

# The shape timed: gradientai/Llama-3-8B-Instruct-Gradient-1048k's config
# (shipped in vllm_headinfer/model_shapes), with positions raised to 4M so
# that contexts past its 1M fit (VLLM_ALLOW_LONG_MAX_MODEL_LEN, set in main).
# Weights are dummy: time and capacity depend on the shape alone.
LLAMA3_8B = {
    **json.loads((model_shapes.path("llama-3-8b-1048k") / "config.json").read_text()),
    "head_dim": 128,
    "max_position_embeddings": 4 * 1024 * 1024,
    "eos_token_id": 128001,
}
KV_BYTES_PER_TOKEN_LAYER_HEAD = 2 * 128 * 2  # K and V, head_dim 128, bf16 (fp8: half)
GIB = 1 << 30
FIRST_TOKENS = 16  # decode tokens after prefill timed as "first tokens"


def write_model(root: Path, layers: int) -> Path:
    path = root / f"llama3-8b-shape-{layers}l"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**LLAMA3_8B, "num_hidden_layers": layers}))
    return path


def config_kwargs(name: str, cpu_kv_gib: float | None) -> dict:
    if name == "FLASH_ATTN":
        return {"attention_backend": "FLASH_ATTN"}
    # "auto": automatic placement; "R4": 4 resident KV heads in every layer.
    # A suffix sets CPU co-attention: "R0+cpu3" (3 offloaded heads of every
    # layer on the CPU; "R0+cpu3.75" in sixteenths), "R0+cpuauto" (auto's
    # measured split). Without one it is off, so that figures compare with
    # runs from before it existed.
    base, _, cpu = name.partition("+")
    m = re.fullmatch(r"cpu(\d+(?:\.\d+)?|auto)", cpu) if cpu else None
    if (cpu and not m) or not re.fullmatch(r"auto|R\d+", base):
        raise ValueError(f"bad config name {name!r}: want FLASH_ATTN, auto or R<n>, "
                         "optionally +cpu<n> or +cpuauto")
    extra = {"resident_kv_heads": "auto" if base == "auto" else int(base[1:]),
             "cpu_attention": "off" if not m else "auto" if m[1] == "auto" else float(m[1])}
    if cpu_kv_gib:
        extra["cpu_kv_gib"] = cpu_kv_gib
    return {"attention_backend": "HEADINFER", "additional_config": {"headinfer": extra}}


def gpu_memory_used_mib() -> list[int]:
    """MiB in use on each visible GPU (a tensor-parallel engine uses several)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True,
        )
    except FileNotFoundError:
        return []
    return list(map(int, out.stdout.split())) if out.returncode == 0 else []


def worker(spec: dict) -> dict:
    """Runs inside a fresh process: one engine, all contexts of a config."""
    from vllm import LLM, SamplingParams

    kwargs = config_kwargs(spec["config"], spec.get("cpu_kv_gib"))
    t0 = time.time()
    llm = LLM(
        spec["model"],
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=spec["max_model_len"],
        max_num_batched_tokens=spec["chunk"],
        gpu_memory_utilization=spec["gpu_util"],
        enable_prefix_caching=False,
        disable_log_stats=False,
        enforce_eager=spec.get("eager", False),
        tensor_parallel_size=spec.get("tp", 1),
        distributed_executor_backend=spec.get("executor"),
        seed=0,
        kv_cache_dtype=spec.get("kv_cache_dtype", "auto"),
        **({"block_size": spec["block_size"]} if spec.get("block_size") else {}),
        **({"compilation_config": {"cudagraph_mode": spec["cudagraph_mode"]}}
           if spec.get("cudagraph_mode") else {}),
        **kwargs,
    )
    result = {"startup_s": round(time.time() - t0, 1), "rows": []}
    if spec.get("capacity_only"):
        cfg = llm.llm_engine.vllm_config
        result["max_model_len"] = cfg.model_config.max_model_len
        return result
    result["gpu_mem_used_mib_per_gpu"] = gpu_memory_used_mib()
    result["gpu_mem_used_mib"] = sum(result["gpu_mem_used_mib_per_gpu"])
    params = SamplingParams(max_tokens=spec["decode_tokens"] + 1, temperature=0.0, ignore_eos=True)
    import random

    rng = random.Random(0)
    steady = spec.get("steady_tokens", 0)
    for ctx in spec["contexts"]:
        prompt = {"prompt_token_ids": [rng.randrange(1000, 100000) for _ in range(ctx)]}
        if steady:
            out, token_times = generate_timed(llm, prompt, params, f"timed-{ctx}")
        else:
            out = llm.generate(prompt, params, use_tqdm=False)[0]
        m = out.metrics
        n_out = len(out.outputs[0].token_ids)
        prefill = m.first_token_ts - m.scheduled_ts
        decode = (m.last_token_ts - m.first_token_ts) / max(1, n_out - 1)
        row = {"context": ctx, "prefill_s": prefill, "prefill_tok_s": ctx / prefill,
               "decode_s_per_token": decode, "generated": n_out}
        if steady:
            # The first tokens after prefill (what a user waits for while the
            # split is measured and retuned) and the last ones alone (what it
            # settled on).
            first = min(FIRST_TOKENS, len(token_times) - 1)
            row["decode_s_per_token_first"] = (token_times[first] - token_times[0]) / first
            row["decode_s_per_token_steady"] = (token_times[-1] - token_times[-1 - steady]) / steady
            row["token_intervals_s"] = [round(b - a, 5) for a, b in zip(token_times, token_times[1:])]
        result["rows"].append(row)
        print(json.dumps(result["rows"][-1]), flush=True)
    return result


def generate_timed(llm, prompt: dict, params, request_id: str):
    """One request, step by step through the engine: its final output and
    the time each of its tokens came out (perf_counter)."""
    engine = llm.llm_engine
    engine.add_request(request_id, prompt, params)
    times, last = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            new = len(out.outputs[0].token_ids) - len(times)
            times += [time.perf_counter()] * new
            last = out
    return last, times


def run_worker(script: str, spec: dict, log: Path, name: str, timeout: int) -> tuple[dict, str]:
    """Runs ``script --worker SPEC`` (one engine) in a fresh process of its
    own process group, so a timeout also ends its engine core; appends its
    output to ``log``. Returns ``ok``, ``wall_s``, the worker's ``RESULT``
    line and, on failure, the output's tail; and the output."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, script, "--worker", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
        ok = proc.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text = (proc.communicate()[0] or "") + "\nTIMEOUT"
        ok = False
    with log.open("a") as f:
        f.write(f"\n===== {name} =====\n{text}")
    parsed = {"ok": ok, "wall_s": round(time.time() - t0, 1)}
    for line in re.findall(r"^RESULT (.*)$", text, re.MULTILINE)[-1:]:
        parsed.update(json.loads(line))
    if not ok:
        parsed["error_tail"] = text[-3000:]
    return parsed, text


def run_config(spec: dict, log: Path, timeout: int) -> dict:
    name = f"{spec['config']}-{spec['layers']}l" + ("-capacity" if spec.get("capacity_only") else "")
    parsed, text = run_worker(__file__, spec, log, name, timeout)
    cap = re.findall(r"GPU KV cache size: ([\d,]+) tokens", text)
    if cap:
        parsed["kv_capacity_tokens"] = int(cap[-1].replace(",", ""))
    conc = re.findall(r"Maximum concurrency for ([\d,]+) tokens per request", text)
    if conc:
        parsed["engine_max_model_len"] = int(conc[-1].replace(",", ""))
    place = re.findall(
        r"HEADINFER placement: (\d+)/(\d+) KV head-layers .*: ([^)]*)\); device KV ([\d.]+) GiB, "
        r"host KV ([\d.]+) GiB; .* decode reads ([\d.]+) MiB over the link per 1K", text)
    if place:
        resident, total, counts, dev, host, mib = place[-1]
        parsed["placement"] = f"{resident}/{total} resident: {counts}"
        parsed["device_kv_gib"], parsed["host_kv_gib"] = float(dev), float(host)
        parsed["link_bytes_per_token"] = float(mib) * (1 << 20) / 1024
    return parsed


def summarise(spec: dict, res: dict, h2d_gbs: float, read_gbs: float,
              host_memory_gbs: float | None = None) -> list[dict]:
    """Per context: the measured figures and the two physical limits of a
    decode step, measured in the same run: the offloaded bytes over the rate
    the GPU's kernels read host memory at (the link), and over the rate
    host memory gives both of its readers at once (what CPU co-attention
    can at best reach; one GPU's run only)."""
    rows = []
    layers, cfg, tp = spec["layers"], spec["config"], spec.get("tp", 1)
    per_token = res.get("link_bytes_per_token", 0)  # one rank, from the placement line
    for row in res.get("rows", []):
        step_bytes = row["context"] * per_token * tp
        offloaded = step_bytes > 0
        device_kv = res.get("device_kv_gib")
        if cfg == "FLASH_ATTN" and res.get("kv_capacity_tokens"):
            per_head = KV_BYTES_PER_TOKEN_LAYER_HEAD // (2 if spec.get("kv_cache_dtype", "auto") != "auto" else 1)
            device_kv = res["kv_capacity_tokens"] * layers * 8 // tp * per_head / GIB
        gbs = step_bytes / row["decode_s_per_token"] / 1e9 if offloaded else None
        rows.append({
            "config": cfg, "layers": layers, "tp": tp, **row,
            "offloaded_bytes_per_step": step_bytes,
            "link_gbs": gbs, "link_share_of_h2d": gbs / (h2d_gbs * tp) if gbs else None,
            "link_share_of_kernel_reads": gbs / (read_gbs * tp) if gbs else None,
            "link_limit_s_per_token": step_bytes / (read_gbs * tp * 1e9) if offloaded else None,
            "host_memory_limit_s_per_token":
                step_bytes / (host_memory_gbs * 1e9) if offloaded and host_memory_gbs and tp == 1 else None,
            "device_kv_gib": device_kv, "host_kv_gib": res.get("host_kv_gib"),
            "gpu_mem_used_mib": res.get("gpu_mem_used_mib"),
            "kv_capacity_tokens": res.get("kv_capacity_tokens"),
            "placement": res.get("placement"),
        })
    return rows


def measure_h2d_gbs() -> float:
    import torch

    src = torch.empty(2 * GIB, dtype=torch.uint8).pin_memory()
    dst = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    gbs = 5 * 2 * GIB / (time.perf_counter() - t) / 1e9
    # Leave GPU 0 as free as the others for the engines that follow.
    del src, dst
    torch.cuda.empty_cache()
    return gbs


def measure_both_readers(kv_cache_dtype: str) -> dict:
    """GB/s of host memory read by both of its readers at once, as CPU
    co-attention's startup probe measures them (the kernel on all cores but
    one, flash attention over UVA; pages of the run's KV format): their sum
    is the host-memory limit of a decode step."""
    import torch

    from vllm_headinfer.coattention.host_cores import cgroup_cpu_quota, usable_cores
    from vllm_headinfer.coattention.probe import measure_rates
    from vllm_headinfer.coattention.split import kernel_threads
    from vllm_headinfer.kv_quant import fp8_dtype

    fp8 = fp8_dtype(kv_cache_dtype)
    # The threads a one-rank engine's auto gives its kernel (affinity and cgroup quota).
    threads = kernel_threads(usable_cores(len(os.sched_getaffinity(0)), cgroup_cpu_quota()).cores)
    cpu, gpu = measure_rates(threads, torch.uint8 if fp8 else torch.bfloat16, fp8, 128, 16)
    return {"host_memory_gbs": (cpu + gpu) / 1e9, "host_memory_cpu_gbs": cpu / 1e9,
            "host_memory_gpu_gbs": gpu / 1e9, "host_memory_threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench_results.json")
    ap.add_argument("--model-dir", default="/tmp/headinfer-bench-models")
    ap.add_argument("--configs", default="FLASH_ATTN,R0,R4,R8")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--contexts", default="32768,131072", help="comma-separated; empty: capacity only")
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--steady-tokens", type=int, default=0,
                    help="also time the last this many tokens alone (the engine stepped here)")
    ap.add_argument("--gpu-util", type=float, default=0.9)
    ap.add_argument("--cpu-kv-gib", type=float, default=None)
    ap.add_argument("--capacity-util", type=float, default=None,
                    help="also start each config at this gpu_memory_utilization with max_model_len=auto")
    ap.add_argument("--capacity-cpu-kv-gib", type=float, default=None)
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="engine max_model_len (default: longest context + decode + 64)")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--cudagraph-mode", default=None, help="vLLM cudagraph_mode, e.g. PIECEWISE")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    ap.add_argument("--executor", default=None, help="distributed executor: mp (default) or ray")
    ap.add_argument("--block-size", type=int, default=0, help="KV block size (0: vLLM's default)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's bf16) or fp8")
    ap.add_argument("--both-readers", action="store_true",
                    help="also measure host memory read by the CPU kernel and the GPU at once "
                    "(the host-memory limit of a decode step)")
    args = ap.parse_args()
    if args.steady_tokens > args.decode_tokens:
        ap.error("--steady-tokens must not exceed --decode-tokens")
    if args.worker:
        res = worker(json.loads(args.worker))
        print("RESULT " + json.dumps(res), flush=True)
        return

    out_path = Path(args.out)
    log = out_path.with_suffix(".log")
    log.write_text("")
    model = write_model(Path(args.model_dir), args.layers)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    h2d = measure_h2d_gbs()
    # The link's limit for decode: the rate kernels read pinned host memory
    # at, which differs from the copy rate by host (benchmarks/RESULTS.md, run 23).
    read = measure_link_gbps()
    report = {"h2d_gbs": h2d, "kernel_read_gbs": read, "layers": args.layers, "chunk": args.chunk, "tp": args.tp,
              "kv_cache_dtype": args.kv_cache_dtype,
              "executor": args.executor, "rows": [], "capacity": [], "runs": {}}
    parallel = {"tp": args.tp, "executor": args.executor, "kv_cache_dtype": args.kv_cache_dtype,
                "block_size": args.block_size}
    print(f"pinned H2D: {h2d:.1f} GB/s; kernels reading pinned host memory: {read:.1f} GB/s", flush=True)
    if args.both_readers:
        report.update(measure_both_readers(args.kv_cache_dtype))
        print(f"host memory, both readers at once: {report['host_memory_gbs']:.1f} GB/s "
              f"(CPU {report['host_memory_cpu_gbs']:.1f} with {report['host_memory_threads']} threads, "
              f"GPU {report['host_memory_gpu_gbs']:.1f})", flush=True)
    for cfg in args.configs.split(",") if contexts else []:
        spec = {"config": cfg, "model": str(model), "layers": args.layers, "contexts": contexts,
                "max_model_len": args.max_model_len or max(contexts) + args.decode_tokens + 64,
                "chunk": args.chunk,
                "decode_tokens": args.decode_tokens, "steady_tokens": args.steady_tokens,
                "gpu_util": args.gpu_util, "cpu_kv_gib": args.cpu_kv_gib, "eager": args.eager,
                "cudagraph_mode": args.cudagraph_mode, **parallel}
        res = run_config(spec, log, args.timeout)
        report["runs"][cfg] = {k: v for k, v in res.items() if k != "rows"}
        report["rows"] += summarise(spec, res, h2d, read, report.get("host_memory_gbs"))
        out_path.write_text(json.dumps(report, indent=1))
        print(cfg, json.dumps(report["runs"][cfg])[:400], flush=True)
    if args.capacity_util:
        for cfg in args.configs.split(","):
            spec = {"config": cfg, "model": str(model), "layers": args.layers, "contexts": [],
                    "max_model_len": -1, "chunk": args.chunk, "decode_tokens": 0,
                    "gpu_util": args.capacity_util, "cpu_kv_gib": args.capacity_cpu_kv_gib,
                    "eager": True, "capacity_only": True, **parallel}
            res = run_config(spec, log, args.timeout)
            report["capacity"].append({"config": cfg, **{k: v for k, v in res.items() if k != "rows"}})
            out_path.write_text(json.dumps(report, indent=1))
            print("capacity", cfg, json.dumps(report["capacity"][-1])[:400], flush=True)
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\nlayers={report['layers']} chunk={report['chunk']} tp={report['tp']} "
          f"pinned H2D {report['h2d_gbs']:.1f} GB/s per GPU, kernel reads of host memory "
          f"{report['kernel_read_gbs']:.1f} GB/s")
    print(f"{'config':<11}{'context':>9}{'prefill tok/s':>15}{'decode s/tok':>14}{'link GB/s':>11}{'of H2D':>8}{'dev KV GiB':>11}{'host KV GiB':>12}")
    for r in report["rows"]:
        gbs = f"{r['link_gbs']:.1f}" if r["link_gbs"] else "-"
        share = f"{r['link_share_of_h2d']:.0%}" if r["link_share_of_h2d"] else "-"
        if r.get("placement"):
            print(f"  placement: {r['placement']}")
        print(f"{r['config']:<11}{r['context']:>9}{r['prefill_tok_s']:>15.0f}{r['decode_s_per_token']:>14.4f}"
              f"{gbs:>11}{share:>8}{r['device_kv_gib'] or 0:>11.2f}{r['host_kv_gib'] or 0:>12.2f}")
        if r.get("decode_s_per_token_steady"):
            print(f"  first {FIRST_TOKENS} tokens {r['decode_s_per_token_first']:.4f} s/token, "
                  f"last tokens alone {r['decode_s_per_token_steady']:.4f} s/token")
        if r.get("link_limit_s_per_token"):
            memory = r.get("host_memory_limit_s_per_token")
            print(f"  limits: link {r['link_limit_s_per_token']:.4f} s/token"
                  + (f", host memory (both readers) {memory:.4f} s/token" if memory else ""))
    for c in report["capacity"]:
        print(f"capacity {c['config']}: max_model_len={c.get('engine_max_model_len')} kv_capacity_tokens={c.get('kv_capacity_tokens')} ok={c['ok']}")


if __name__ == "__main__":
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    main()
