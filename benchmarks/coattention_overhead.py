"""What CPU co-attention adds to a layer besides the kernel's reads (CUDA).

Runs the engine's own per-layer sequence (``CudaHeadAttention._coattend``: runtime post, the GPU's share, runtime collect):
the call posted to the serving thread, the CPU heads' queries copied to the
pinned slot and the call published on the stream, the GPU's share launched
(nothing, or a GPU sleep standing in for it), the stream waiting for the
serving thread's answer and copying the output back, layer after layer as a
decode step runs them; and the same kernel calls alone on host tensors in
the calling thread. Without GPU work the difference per layer is the round
trip; with a GPU share longer than the kernel (as in every step the
engine's gate lets through) what the layer takes past that share is what
co-attention adds to it (the target for a co-attending layer's fixed cost
is 50 us). Also the host's own time per layer call (what the model's
thread spends; it does not wait for the GPU). Llama-3-8B layer: 8 offloaded KV heads, 3 of
them on the CPU (run 13's split), GQA 4, head_dim 128, 16-token bf16 blocks.

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
from vllm_headinfer.coattention.runtime import (  # noqa: E402
    CoattentionRuntime,
    served_layer,
    served_tables,
)
from vllm_headinfer.coattention.share import CpuShare, HostStep  # noqa: E402
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


def sleep_cycles_per_us() -> float:
    """The GPU's clock, for torch.cuda._sleep (a spin of so many cycles)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(10**6)
    start.record()
    torch.cuda._sleep(10**7)
    end.record()
    end.synchronize()
    return 10**7 / (start.elapsed_time(end) * 1e3)


def measure(context: int, threads: int, cpu_heads: int, layers: int, reps: int,
            cycles_per_us: float) -> dict:
    impl = SimpleNamespace(num_kv_heads=KV_HEADS, group=GROUP, num_offloaded=KV_HEADS,
                           scale=DIM**-0.5, kv_cache_dtype="auto")
    share = CpuShare(impl, cpu_heads, threads)
    gpu_cycles = [0]  # the GPU share's stand-in, per layer call

    def gpu_share(*args) -> None:
        if gpu_cycles[0]:
            torch.cuda._sleep(gpu_cycles[0])

    blocks = -(-context // BLOCK)
    pages = torch.randn(host_page_shape(blocks, KV_HEADS, BLOCK, DIM)).to(torch.bfloat16)
    buffers = tuple(torch.empty(n, dtype=torch.int64, pin_memory=True) for n in (blocks, 1, 2))
    buffers[0].copy_(torch.randperm(blocks))
    buffers[1].fill_(context)
    buffers[2].copy_(torch.tensor([0, 1]))
    step = HostStep(buffers[0].view(1, blocks), buffers[1], buffers[2], 1, buffers)
    query = torch.randn(1, KV_HEADS * GROUP, DIM, dtype=torch.bfloat16, device="cuda")
    output = torch.empty_like(query)
    runtime = CoattentionRuntime()
    runtime.reserve(1, 1, 1, KV_HEADS * GROUP, DIM)
    cuda = runtime.slots(query.dtype)
    cuda.service.register([(share.key, served_layer(share, None, pages, lambda layer: 1.0))],
                          [served_tables(buffers)])
    rows = share.query_heads
    host_query = query[:, rows].cpu()
    host_out = torch.empty_like(host_query)

    def layer_call() -> None:
        call = runtime.post(share, query, step)
        gpu_share()
        runtime.collect(call, share, step, output)

    def kernel_call() -> None:
        share.attend(None, host_query, pages, step, host_out)

    time.sleep(0.1)  # the serving thread's idle spin over: the kernel alone
    kernel = per_layer_us(kernel_call, layers, reps)
    with_round_trip = per_layer_us(layer_call, layers, reps)
    gpu_us = 2 * kernel + 100  # the GPU's share outlasts the kernel and the host's call
    gpu_cycles[0] = int(gpu_us * cycles_per_us)
    with_gpu_share = per_layer_us(layer_call, layers, reps)
    gpu_cycles[0] = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(layers):
        layer_call()
    launch = (time.perf_counter() - t0) / layers * 1e6
    torch.cuda.synchronize()
    torch.testing.assert_close(output[:, rows].cpu(), host_out)  # the same attention
    return {"context": context, "threads": threads, "cpu_heads": cpu_heads,
            "layer_us": round(with_round_trip, 1), "kernel_us": round(kernel, 1),
            "round_trip_us": round(with_round_trip - kernel, 1), "host_us": round(launch, 1),
            "gpu_share_us": round(gpu_us, 1), "layer_with_gpu_share_us": round(with_gpu_share, 1),
            "added_us": round(with_gpu_share - gpu_us, 1)}


def main() -> None:
    args = parse_args()
    rows, cycles_per_us = [], sleep_cycles_per_us()
    for threads in [int(t) for t in args.threads.split(",")]:
        for context in [int(c) for c in args.contexts.split(",")]:
            rows.append(measure(context, threads, args.cpu_heads, args.layers, args.reps,
                                cycles_per_us))
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
