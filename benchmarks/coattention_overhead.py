"""What CPU co-attention adds to a layer besides the kernel's reads (CUDA).

Runs the engine's own per-layer sequence (``coattention_path.coattend``):
the CPU heads' queries copied to pinned memory, the GPU's share launched
(here nothing: its cost is the link's, measured elsewhere), the host waiting
for the queries, the kernel over the CPU heads' pages, the output copied
back, layer after layer as a decode step runs them, and the same kernel
calls alone on host tensors. The difference per layer is the round trip
(the target for a whole co-attending layer's fixed cost is 50 us). Llama-3-8B layer: 8 offloaded KV heads, 3 of them on
the CPU (run 13's split), GQA 4, head_dim 128, 16-token bf16 blocks.

Usage (GPU host): python3 benchmarks/coattention_overhead.py --out $OUT/coattn_overhead.json
"""

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # runs from a checkout
from vllm_headinfer.coattention_path import CpuShare, HostStep, coattend, pinned  # noqa: E402
from vllm_headinfer.layout import host_page_shape  # noqa: E402

KV_HEADS, GROUP, DIM, BLOCK = 8, 4, 128, 16


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="16,4096,32768", help="tokens of the one decoding request")
    p.add_argument("--threads", default=str(max(1, len(os.sched_getaffinity(0)) - 1)),
                   help="at most this many (the kernel takes fewer for short contexts)")
    p.add_argument("--cpu-heads", type=int, default=3)
    p.add_argument("--layers", type=int, default=320, help="layer calls per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="coattn_overhead.json")
    return p.parse_args()


def per_layer_us(run, layers: int, reps: int) -> float:
    """Median over reps of the wall time per layer call, the GPU drained."""
    run()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(layers):
            run()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / layers * 1e6)
    return statistics.median(times)


def measure(context: int, threads: int, cpu_heads: int, layers: int, reps: int) -> dict:
    impl = SimpleNamespace(num_kv_heads=KV_HEADS, group=GROUP, num_offloaded=KV_HEADS,
                           scale=DIM**-0.5, kv_cache_dtype="auto")
    share = CpuShare(impl, cpu_heads, threads)
    ops = SimpleNamespace(impl=SimpleNamespace(cpu_share=share), query_scale=lambda layer: 1.0,
                          read_in_place=lambda *args: None)
    blocks = -(-context // BLOCK)
    pages = torch.randn(host_page_shape(blocks, KV_HEADS, BLOCK, DIM)).to(torch.bfloat16)
    step = HostStep(torch.randperm(blocks)[None], torch.tensor([context]), torch.tensor([0, 1]),
                    1, torch.cuda.Event())
    step.ready.record()
    m = SimpleNamespace(host_step=step)
    query = torch.randn(1, KV_HEADS * GROUP, DIM, dtype=torch.bfloat16, device="cuda")
    output = torch.empty_like(query)
    pinned.reserve(query.numel() * 4)
    rows = share.query_heads
    host_query = query[:, rows].cpu()
    host_out = torch.empty_like(host_query)

    def layer_call() -> None:
        coattend(ops, None, query, None, pages, None, m, output)

    def kernel_call() -> None:
        share.attend(None, host_query, pages, step, host_out)

    with_round_trip = per_layer_us(layer_call, layers, reps)
    kernel = per_layer_us(kernel_call, layers, reps)
    torch.testing.assert_close(output[:, rows].cpu(), host_out)  # the same attention
    return {"context": context, "threads": threads, "cpu_heads": cpu_heads,
            "layer_us": round(with_round_trip, 1), "kernel_us": round(kernel, 1),
            "round_trip_us": round(with_round_trip - kernel, 1)}


def main() -> None:
    args = parse_args()
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for context in [int(c) for c in args.contexts.split(",")]:
            rows.append(measure(context, threads, args.cpu_heads, args.layers, args.reps))
            print(json.dumps(rows[-1]), flush=True)
    import numba

    with open("/proc/self/maps") as maps:  # which OpenMP runtime numba's threads run on
        omp = sorted({line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]})
    print("numba threading layer:", numba.threading_layer(), "OpenMP libraries:", omp)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "threading_layer": numba.threading_layer(),
                   "omp_libraries": omp, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
