"""The startup measurement behind CPU co-attention's auto split (CUDA only).

Both readers of host memory at once, as in a decode step, each over
synthetic pages of the layer's page format (blocks in random order, as in a
served pool; the CPU a half of each block's heads, in a pool of the layer's
offloaded heads): on a side stream the GPU runs flash attention over pinned
pages through their UVA view, as decode steps read offloaded heads, while
CPU threads run the co-attention kernel over pages of their own. They share
the host's memory, so each rate is taken while the other reader runs: the
GPU's calls are queued first, then the kernel runs call after call until
the last GPU call has finished; of three such rounds, each reader's median
rate counts. (Copies of pinned memory, which this probe once timed instead,
move about 10% more bytes per second than flash attention reads in place in
a step; the split leaned towards the GPU by that much.)
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch

from vllm_headinfer.coattention.kernel import decode_attention
from vllm_headinfer.host_pool import huge_page_mapping
from vllm_headinfer.layout import fa_view, host_kv, host_page_shape

PROBE_BYTES = 256 << 20  # each reader's pages: five times the GPU's L2 cache
GPU_CALLS = 60  # 15 GiB: about 0.3 s at the link's ~50 GB/s
# Rounds of both readers at once; each reader's median rate is taken: in
# engines of run 16 single rounds read the CPU at 39-56 GB/s (the engine's
# startup runs beside it), and a split in sixteenths follows the rates.
PROBE_ROUNDS = 3
PROBE_HEADS, PROBE_GROUP = 8, 4  # a Llama-3-8B layer's KV and query heads per KV head


@contextlib.contextmanager
def _pinned(nbytes: int):
    """Host memory pinned like the pool's (and unpinned after): the pinned
    caching allocator would keep a freed buffer for the life of the process.
    Zeros: finite keys and values in every format the bytes are viewed as."""
    buffer = torch.frombuffer(huge_page_mapping(nbytes), dtype=torch.uint8).zero_()
    cudart = torch.cuda.cudart()
    err = int(cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0))
    if err != 0:
        raise RuntimeError(f"HEADINFER could not pin {nbytes >> 20} MiB to measure "
                           f"CPU co-attention (cudaHostRegister error {err})")
    try:
        yield buffer
    finally:
        cudart.cudaHostUnregister(buffer.data_ptr())


def _gpu_reader(source: torch.Tensor, dtype: torch.dtype, head_size: int, block_size: int):
    """One decode call of flash attention over ``source`` (pinned host
    memory) viewed as a layer's offloaded pages, read in place over UVA, as
    decode steps read them. An fp8 cache is read as 16-bit pages of the same
    block geometry: the rate in bytes per second is what the split needs."""
    from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version

    if dtype.itemsize != 2 or not dtype.is_floating_point:
        dtype = torch.bfloat16
    blocks = source.numel() // (PROBE_HEADS * 2 * block_size * head_size * dtype.itemsize)
    shape = host_page_shape(blocks, PROBE_HEADS, block_size, head_size)
    pages = get_accelerator_view_from_cpu_tensor(source).view(dtype)[: math.prod(shape)].view(shape)
    k, v = host_kv(pages)
    device = pages.device
    query = torch.ones(1, PROBE_HEADS * PROBE_GROUP, head_size, dtype=dtype, device=device)
    out = torch.empty_like(query)
    table = torch.randperm(blocks, device=device, dtype=torch.int32)[None]
    cu_seqlens_q = torch.tensor([0, 1], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([blocks * block_size], dtype=torch.int32, device=device)
    version = get_flash_attn_version(head_size=head_size)

    def read() -> None:
        flash_attn_varlen_func(
            q=query, k=fa_view(k), v=fa_view(v), out=out, cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=1, seqused_k=seq_lens, max_seqlen_k=blocks * block_size,
            softmax_scale=head_size**-0.5, causal=True, block_table=table, fa_version=version,
        )

    return read, pages.nbytes


def measure_rates(
    threads: int, dtype: torch.dtype, fp8: torch.dtype | None, head_size: int, block_size: int,
    heads: int = PROBE_HEADS,
) -> tuple[float, float]:
    """(CPU, GPU) bytes/s of host memory read while both read it, the CPU
    with ``threads`` kernel threads over pages of ``dtype`` (fp8 bytes in
    the format ``fp8``) of a layer with ``heads`` offloaded heads, the GPU
    with flash attention over UVA."""
    page = 2 * block_size * head_size * dtype.itemsize
    blocks = PROBE_BYTES // (heads * page)
    pool = torch.ones(host_page_shape(blocks, heads, block_size, head_size), dtype=dtype)
    # The CPU reads the last half of each block's heads (a one-head layer:
    # its head), as it reads its share of a layer in a step: how many heads
    # lie next to each other sets its rate (run 16, link busy, 15 threads:
    # 40 GB/s over a one-head pool, 33-43 over 1-2 heads of an 8-head one,
    # about 50 over 4 of 8, 58 over whole 8-head blocks).
    pages = pool[:, heads // 2 :]
    query = torch.ones(1, pages.shape[1] * PROBE_GROUP, head_size)
    out = torch.empty_like(query)
    table = torch.randperm(blocks)[None]
    seq_lens, starts = torch.tensor([blocks * block_size]), torch.tensor([0, 1])

    def attend() -> None:
        decode_attention(query, pages, table, seq_lens, starts, 1.0, out, threads=threads, fp8=fp8)

    stream = torch.cuda.Stream()
    rates = []
    with _pinned(PROBE_BYTES) as source:
        read, gpu_bytes = _gpu_reader(source, dtype, head_size, block_size)
        attend()  # compiled (or loaded) and the threads started
        with torch.cuda.stream(stream):
            read()
        stream.synchronize()
        for _ in range(PROBE_ROUNDS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            with torch.cuda.stream(stream):
                for _ in range(GPU_CALLS):
                    read()
            end.record(stream)
            began, calls = time.perf_counter(), 0
            while calls == 0 or not end.query():
                attend()
                calls += 1
            cpu_seconds = time.perf_counter() - began
            end.synchronize()
            gpu_seconds = start.elapsed_time(end) / 1e3
            rates.append((calls * pages.nbytes / cpu_seconds, GPU_CALLS * gpu_bytes / gpu_seconds))
    torch.cuda.empty_cache()
    return tuple(statistics.median(r[i] for r in rates) for i in (0, 1))
