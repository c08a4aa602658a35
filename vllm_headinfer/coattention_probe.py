"""The startup measurement behind CPU co-attention's auto split (CUDA only).

Both readers of host memory at once, as in a decode step: the GPU copies
pinned host memory to the device on a side stream while CPU threads run the
co-attention kernel over synthetic pages of the layer's page format (blocks
in random order, as in a served pool). They share the host's memory, so each
rate is taken while the other reader runs: the copies are queued first, then
the kernel runs call after call until the last copy has finished.
"""

from __future__ import annotations

import contextlib
import time

import torch

from vllm_headinfer.cpu_coattention import decode_attention
from vllm_headinfer.host_pool import huge_page_mapping
from vllm_headinfer.layout import host_page_shape

PROBE_BYTES = 256 << 20  # the kernel's pages, and the copies' pinned source
COPY_BYTES = 64 << 20  # one copy (the device buffer it lands in)
COPIES = 200  # 13 GiB: about 0.25 s at the link's 55 GB/s
PROBE_HEADS, PROBE_GROUP = 8, 4  # a Llama-3-8B layer's KV and query heads per KV head


@contextlib.contextmanager
def _pinned(nbytes: int):
    """Host memory pinned like the pool's (and unpinned after): the pinned
    caching allocator would keep a freed buffer for the life of the process."""
    buffer = torch.frombuffer(huge_page_mapping(nbytes), dtype=torch.uint8).fill_(1)
    cudart = torch.cuda.cudart()
    err = int(cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0))
    if err != 0:
        raise RuntimeError(f"HEADINFER could not pin {nbytes >> 20} MiB to measure "
                           f"CPU co-attention (cudaHostRegister error {err})")
    try:
        yield buffer
    finally:
        cudart.cudaHostUnregister(buffer.data_ptr())


def measure_rates(
    threads: int, dtype: torch.dtype, fp8: torch.dtype | None, head_size: int, block_size: int
) -> tuple[float, float]:
    """(CPU, GPU) bytes/s of host memory read while both read it, the CPU
    with ``threads`` kernel threads over pages of ``dtype`` (fp8 bytes in
    the format ``fp8``)."""
    from vllm_headinfer.coattention_path import use_threads

    use_threads(threads)
    page = 2 * block_size * head_size * dtype.itemsize
    blocks = PROBE_BYTES // (PROBE_HEADS * page)
    pages = torch.ones(host_page_shape(blocks, PROBE_HEADS, block_size, head_size), dtype=dtype)
    query = torch.ones(1, PROBE_HEADS * PROBE_GROUP, head_size)
    out = torch.empty_like(query)
    table = torch.randperm(blocks)[None]
    seq_lens, starts = torch.tensor([blocks * block_size]), torch.tensor([0, 1])

    def attend() -> None:
        decode_attention(query, pages, table, seq_lens, starts, 1.0, out, fp8=fp8)

    stream = torch.cuda.Stream()
    device_buffer = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    with _pinned(PROBE_BYTES) as source:

        def copy(n: int) -> None:
            with torch.cuda.stream(stream):
                for i in range(n):
                    offset = i * COPY_BYTES % PROBE_BYTES
                    device_buffer.copy_(source[offset : offset + COPY_BYTES], non_blocking=True)

        attend()  # compiled (or loaded) and the threads started
        copy(1)
        stream.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        copy(COPIES)
        end.record(stream)
        began, calls = time.perf_counter(), 0
        while calls == 0 or not end.query():
            attend()
            calls += 1
        cpu_seconds = time.perf_counter() - began
        end.synchronize()
    del device_buffer
    torch.cuda.empty_cache()
    gpu_seconds = start.elapsed_time(end) / 1e3
    return calls * pages.nbytes / cpu_seconds, COPIES * COPY_BYTES / gpu_seconds
