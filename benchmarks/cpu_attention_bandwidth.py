"""K/V read bandwidth of the CPU co-attention kernel, by thread count.

Llama-3-8B shape (head_dim 128, GQA 4: 32 query heads over 8 KV heads),
16-token blocks, bf16 (or, with --dtypes, fp16 and fp8 pages), one request
decoding one token over 131,072 tokens of
one layer's host pages ``[blocks, H, 2, 16, 128]`` (layout.py), blocks in
random order. A call attends 4 or 8 KV heads: all of a pool of that many
("own"), and for 4 also half of an 8-head pool ("slice": the heads CPU
threads would take from a layer whose other offloaded heads the GPU reads).
GB/s = K and V bytes of the attended tokens / wall time of one
``decode_attention`` call (median of reps). Each thread
count runs (a) alone and, with CUDA, (b) "link busy": pinned host -> GPU
copies run during the call, as the GPU reads host KV over PCIe while the CPU
attends and the DMA reads compete for host memory; the H2D GB/s achieved
while the CPU ran is reported with it.

Usage (GPU host): python3 benchmarks/cpu_attention_bandwidth.py --out $OUT/cpu_attn_bw.json
Small run without a GPU: ... --context 8192 --threads 1,2 --out /tmp/x.json
Page formats: ... --dtypes bf16,fp16,fp8_e4m3 (GB/s counts each format's own bytes)
"""

import argparse
import json
import math
import mmap
import os
import statistics
import sys
import time

import numba
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # runs from a checkout
from vllm_headinfer.coattention.kernel import decode_attention  # noqa: E402
from vllm_headinfer.host_pool import huge_page_mapping  # noqa: E402
from vllm_headinfer.layout import host_page_shape  # noqa: E402

DIM, GROUP, BLOCK, POOL_HEADS = 128, 4, 16, 8
CHUNK = 64 << 20  # H2D copy size: short enough to time the window finely
# Page formats: (torch dtype of the pages, fp8 format passed to the kernel).
DTYPES = {"bf16": (torch.bfloat16, None), "fp16": (torch.float16, None),
          "fp8_e4m3": (torch.uint8, torch.float8_e4m3fn),
          "fp8_e5m2": (torch.uint8, torch.float8_e5m2)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--threads", default="1,2,4,8,12,14,16")
    p.add_argument("--heads", default="4,8", help="KV heads attended per call")
    p.add_argument("--dtypes", default="bf16", help=f"page formats, of {','.join(DTYPES)}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--busy-gib", type=float, default=2.0, help="pinned source of the H2D copies")
    p.add_argument("--out", default="cpu_attn_bw.json")
    return p.parse_args()


def thread_counts(spec: str) -> list[int]:
    """Requested counts clipped to the cores this process may use (and to
    numba's pool, which set_num_threads cannot exceed), without repeats."""
    cap = min(len(os.sched_getaffinity(0)), numba.config.NUMBA_NUM_THREADS)
    return list(dict.fromkeys(min(int(t), cap) for t in spec.split(",")))


def host_pages(context: int, heads: int, dtype: str) -> tuple[torch.Tensor, mmap.mmap]:
    """One layer's pages, allocated like the host pool (anonymous mapping
    with transparent huge pages: fewer TLB misses for the CPU too)."""
    torch_dtype, fp8 = DTYPES[dtype]
    shape = host_page_shape(math.ceil(context / BLOCK), heads, BLOCK, DIM)
    mapping = huge_page_mapping(math.prod(shape) * torch_dtype.itemsize)
    pages = torch.frombuffer(mapping, dtype=torch_dtype).view(shape)
    # Real values (and every page faulted in before timing); fp8 bytes a
    # block at a time, so no float32 copy of the whole pool is needed.
    if fp8 is None:
        pages.normal_()
    else:
        for block in pages.view(fp8).unbind(0):
            block.copy_(torch.randn(block.shape))
    return pages, mapping


def decode_call(pages: torch.Tensor, heads: int, context: int, dtype: str):
    """A closure: one decode step of one request over the first ``heads`` of
    ``pages``, with a given number of threads."""
    fp8 = DTYPES[dtype][1]
    table = torch.randperm(pages.shape[0], dtype=torch.int32)[None]  # scattered, as in serving
    query = torch.randn(1, heads * GROUP, DIM).to(torch.bfloat16)
    seq_lens = torch.tensor([context], dtype=torch.int32)
    starts = torch.tensor([0, 1], dtype=torch.int32)
    out, part = torch.empty_like(query), pages[:, :heads]
    return lambda threads: decode_attention(query, part, table, seq_lens, starts, DIM**-0.5, out,
                                            threads=threads, fp8=fp8)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class LinkLoad:
    """Pinned host -> GPU copies queued on a side stream around a CPU call.
    The kernel holds the GIL while it runs (numba without nogil), so no Python
    thread could issue copies then: the window's copies are queued before the
    call, an event after each one."""

    def __init__(self, gib: float) -> None:
        self.slots = max(1, int(gib * (1 << 30)) // CHUNK)
        self.src = torch.empty(self.slots * CHUNK, dtype=torch.uint8, pin_memory=True)
        self.dst = torch.empty(CHUNK, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()
        self.rate = self._link_rate()  # bytes/s with the link to itself

    def _queue(self, n: int) -> list[torch.cuda.Event]:
        marks = [torch.cuda.Event(enable_timing=True)]
        with torch.cuda.stream(self.stream):
            marks[0].record()
            for i in range(n):
                off = (i % self.slots) * CHUNK
                self.dst.copy_(self.src[off : off + CHUNK], non_blocking=True)
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
        return marks

    def _link_rate(self) -> float:
        for _ in range(2):  # the first pass warms the copy path
            marks = self._queue(self.slots)
            self.stream.synchronize()
        return self.slots * CHUNK / marks[0].elapsed_time(marks[-1]) * 1e3

    @staticmethod
    def _done(marks) -> int:
        """Chunks finished so far (one stream: events complete in order)."""
        n = 0
        while n + 1 < len(marks) and marks[n + 1].query():
            n += 1
        return n

    def during(self, fn, expect_s: float) -> tuple[float, float | None, bool]:
        """CPU seconds of ``fn``, H2D GB/s over the chunks that finished
        while it ran, and whether copies were still queued when it ended."""
        # Three times the alone time: the call slows down under the load.
        marks = self._queue(math.ceil(3 * expect_s * self.rate / CHUNK) + 4)
        marks[1].synchronize()  # the link is streaming before the CPU starts
        first = self._done(marks)
        seconds = timed(fn)
        last = self._done(marks)
        self.stream.synchronize()
        done = (last - first) * CHUNK  # bytes of the chunks that finished inside the call
        gbps = done / marks[first].elapsed_time(marks[last]) / 1e6 if done else None
        return seconds, gbps, last < len(marks) - 1


def measure(call, threads: int, reps: int, load: LinkLoad | None, kv_bytes: int) -> dict:
    fn = lambda: call(threads)  # noqa: E731
    fn()  # thread pool up, caches warm
    alone = statistics.median(timed(fn) for _ in range(reps))
    row = {"threads": threads, "alone_ms": alone * 1e3, "alone_gbps": kv_bytes / alone / 1e9}
    if load is not None:
        runs = [load.during(fn, alone) for _ in range(reps)]
        busy = statistics.median(r[0] for r in runs)
        rates = [r[1] for r in runs if r[1] is not None]
        row.update(busy_ms=busy * 1e3, busy_gbps=kv_bytes / busy / 1e9,
                   h2d_gbps=statistics.median(rates) if rates else None,
                   link_busy_whole_call=all(r[2] for r in runs))
    return row


def run_cases(args, load: LinkLoad | None) -> list[dict]:
    rows = []
    for dtype in args.dtypes.split(","):
        pools = {}  # KV heads -> (pages, mapping that must outlive them)
        for heads in (int(h) for h in args.heads.split(",")):
            kv_bytes = args.context * heads * 2 * DIM * DTYPES[dtype][0].itemsize
            for pages in ("own", "slice") if heads < POOL_HEADS else ("own",):
                size = heads if pages == "own" else POOL_HEADS
                pools[size] = pools.get(size) or host_pages(args.context, size, dtype)
                fn = decode_call(pools[size][0], heads, args.context, dtype)
                fn(1)  # JIT compile (or load numba's cache) outside the timing
                for threads in thread_counts(args.threads):
                    rows.append({"dtype": dtype, "kv_heads": heads, "pages": pages,
                                 "kv_bytes": kv_bytes,
                                 **measure(fn, threads, args.reps, load, kv_bytes)})
    return rows


COLUMNS = {"dtype": "dtype", "kv_heads": "heads", "pages": "pages", "threads": "thr",
           "alone_ms": "alone ms", "alone_gbps": "GB/s", "busy_ms": "busy ms", "busy_gbps": "GB/s",
           "h2d_gbps": "H2D GB/s", "link_busy_whole_call": "covered"}


def print_table(rows: list[dict]) -> None:
    print(" ".join(f"{title:>9}" for title in COLUMNS.values()))
    for r in rows:
        cells = ("-" if r.get(k) is None else r[k] for k in COLUMNS)
        print(" ".join(f"{v:>9.2f}" if type(v) is float else f"{v!s:>9}" for v in cells))


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    load = LinkLoad(args.busy_gib) if cuda else None
    h2d_alone = load.rate / 1e9 if load else None
    cores = len(os.sched_getaffinity(0))
    print(f"context {args.context}, {args.dtypes}, D {DIM}, GQA {GROUP}, block {BLOCK}, {cores} cores")
    print(f"H2D alone: {h2d_alone:.2f} GB/s" if cuda else "no CUDA: alone only, link busy not run")
    print_table(rows := run_cases(args, load))
    result = {**vars(args), "head_dim": DIM, "gqa": GROUP, "block_size": BLOCK, "batch": 1,
              "cuda": cuda, "h2d_alone_gbps": h2d_alone,
              "device": torch.cuda.get_device_name() if cuda else "cpu only: link busy not run",
              "cores_usable": cores, "numba_threading_layer": numba.threading_layer(), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
