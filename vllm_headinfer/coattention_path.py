"""CPU co-attention in the data path: in decode and verify steps CPU threads
attend the last offloaded KV heads of a layer in host memory while the GPU
reads the others over the link.

A layer's KV heads are then ``[0, R)`` resident, ``[R, H - c)`` offloaded and
read by the GPU, ``[H - c, H)`` offloaded and attended by CPU threads with
``cpu_coattention.decode_attention``, straight from the host pool's CPU tensor (a head slice of its pages, read in place). Query
heads follow their KV head, so each part writes its own slice of the output.

On CUDA, per layer (``coattend``):

1. the CPU heads' queries are copied into pinned host memory on the current
   stream, and an event is recorded after the copy. This step's K/V were
   written into the pool (through its UVA view) earlier on the same stream,
   so once the event has completed the CPU reads them;
2. the GPU's attention is launched as without co-attention, over its
   narrower slice of the pool's UVA view;
3. the host waits for the event and runs the kernel into a pinned output
   buffer, while the GPU reads its share;
4. that output is copied into the layer's output on the current stream.

Step 3 is host work inside the layer, so such steps cannot run inside CUDA
graphs: where co-attention is on, metadata.py keeps attention out of full
graphs (piecewise graphs capture the rest of the model). On CPU (what CI
runs) an explicit ``cpu_attention`` routes the same heads through the kernel.

numba (the kernel's compiler) is imported only where a layer uses the
kernel: on vLLM 0.32's CPU platform, an engine started in a process that has
loaded numba's llvmlite fails (its worker's scan of every module for Triton
kernels trips over llvmlite's library object).
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass

import torch
from vllm.platforms import current_platform
from vllm.utils.math_utils import cdiv

from vllm_headinfer.coattention_split import RankSplit, auto_split, kernel_threads, rank_cores
from vllm_headinfer.config import HeadInferConfig, ranks_per_node
from vllm_headinfer.kv_quant import Fp8Scales, fp8_dtype

# Layer calls the kernel served in this process, by step kind ("decode":
# one query token per request, "verify": more); the tests' engine runner
# reports them to show the path ran.
CALLS: collections.Counter = collections.Counter()

_thread_state = threading.local()


def use_threads(threads: int) -> None:
    """The kernel's thread count for the calling thread (numba keeps it per
    thread), set once per thread."""
    import numba

    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    if getattr(_thread_state, "threads", None) != threads:
        numba.set_num_threads(threads)
        _thread_state.threads = threads


# Auto's measurement, once per process (and page format).
_measured: dict[tuple, RankSplit] = {}


def rank_split(vllm_config, spec) -> RankSplit:
    """This rank's co-attention for layers of ``spec``'s page format."""
    cfg = HeadInferConfig.from_vllm_config(vllm_config)
    cores = rank_cores(len(os.sched_getaffinity(0)), ranks_per_node(vllm_config))
    threads = cfg.cpu_attention_threads if isinstance(cfg.cpu_attention_threads, int) else None
    if cfg.fixed_cpu_heads is not None:
        return RankSplit(threads=threads or kernel_threads(cores), fixed=cfg.fixed_cpu_heads)
    if not current_platform.is_cuda():
        return RankSplit(fixed=0)  # auto on CPU: no link to relieve
    if cfg.resolved_decode_path != "uva":
        return RankSplit(fixed=0, off_reason="decode_path is 'staged'")
    fp8 = fp8_dtype(vllm_config.cache_config.cache_dtype)
    key = (cores, threads, spec.dtype, fp8, spec.head_size, spec.block_size)
    if key not in _measured:
        from vllm_headinfer.coattention_probe import measure_rates

        _measured[key] = auto_split(
            cores, threads,
            lambda t: measure_rates(t, spec.dtype, fp8, spec.head_size, spec.block_size),
        )
    return _measured[key]


@dataclass
class HostStep:
    """A short-query step's metadata on the host, for the kernel: on CUDA
    in pinned buffers that are complete once ``ready`` has completed."""

    block_table: torch.Tensor  # [requests, blocks]
    seq_lens: torch.Tensor  # [requests], exact: this step's tokens included
    query_start_loc: torch.Tensor  # [requests + 1]
    tokens: int  # query tokens of the step's requests (without padding)
    ready: torch.cuda.Event | None = None


class HostStepCopies:
    """Builds each short-query step's HostStep (int64, what the kernel
    reads). On CUDA the device tensors are copied into pinned buffers
    without a host sync (the layers wait for an event before reading); they
    are not the host copies vLLM keeps, which hold upper bounds of the
    lengths and, with adaptive verification, not the per-request offsets."""

    def __init__(self, max_requests: int, block_size: int) -> None:
        self.max_requests = max_requests
        self.block_size = block_size
        self.buffers: tuple[torch.Tensor, ...] | None = None

    def __call__(self, m) -> HostStep:
        n = m.num_reqs
        table = m.block_table_tensor
        blocks = min(cdiv(m.max_seq_len, self.block_size), table.shape[1])
        tokens = int(m.query_start_loc_cpu[n])
        if table.device.type == "cpu":
            return HostStep(table[:n, :blocks].long(), m.seq_lens[:n].long(),
                            m.query_start_loc[: n + 1].long(), tokens)
        if self.buffers is None or self.buffers[0].numel() < n * blocks:
            # Once: vLLM's block table keeps its width from step to step.
            self.buffers = tuple(
                torch.empty(size, dtype=torch.int64, pin_memory=True)
                for size in (self.max_requests * table.shape[1], self.max_requests + 1,
                             self.max_requests + 1)
            )
        table_buf, seq_buf, start_buf = self.buffers
        step = HostStep(table_buf[: n * blocks].view(n, blocks), seq_buf[:n],
                        start_buf[: n + 1], tokens, torch.cuda.Event())
        step.block_table.copy_(table[:n, :blocks], non_blocking=True)
        step.seq_lens.copy_(m.seq_lens[:n], non_blocking=True)
        step.query_start_loc.copy_(m.query_start_loc[: n + 1], non_blocking=True)
        step.ready.record()
        return step


class CpuShare:
    """The last ``heads`` offloaded KV heads of a layer, which CPU threads
    attend in short-query steps."""

    def __init__(self, impl, heads: int, threads: int) -> None:
        h, g = impl.num_kv_heads, impl.group
        self.heads = heads
        self.threads = threads
        self.group = g
        self.gpu_heads = impl.num_offloaded - heads  # offloaded heads the GPU reads
        self.pool_start = self.gpu_heads  # first CPU head in the pool's pages
        self.kv_heads = slice(h - heads, h)
        self.query_heads = slice((h - heads) * g, h * g)
        self.scale = impl.scale
        self.kv_cache_dtype = impl.kv_cache_dtype
        self._runs: list[tuple[slice, dict]] | None = None

    def _kernel_runs(self, layer, query_scale) -> list[tuple[slice, dict]]:
        """(heads of the share, kernel arguments) per kernel call: one call,
        or one per head where an fp8 cache has per-head scales. Scales are
        read once (on CUDA they are device tensors)."""
        if self._runs is None:
            every = slice(0, self.heads)
            scale = {"scale": self.scale * query_scale(layer)}
            fp8 = Fp8Scales.of(layer, self.kv_cache_dtype, self.kv_heads)
            if fp8 is None:
                self._runs = [(every, scale)]
            elif fp8.k.dim() == 0:
                self._runs = [(every, {**scale, "fp8": fp8.dtype, "k_scale": float(fp8.k),
                                       "v_scale": float(fp8.v)})]
            else:
                k, v = fp8.k.tolist(), fp8.v.tolist()
                self._runs = [(slice(i, i + 1), {**scale, "fp8": fp8.dtype, "k_scale": k[i],
                                                 "v_scale": v[i]}) for i in range(self.heads)]
        return self._runs

    def attend(self, layer, query, pages, step: HostStep, out, query_scale=lambda layer: 1.0):
        """The share's attention on the host: ``query`` and ``out``
        ``[step.tokens, heads * G, D]``, ``pages`` the layer's host pages
        ``[blocks, H_off, 2, N, D]``. ``query_scale(layer)`` is the scale of
        fp8 queries (1 for plain ones)."""
        from vllm_headinfer.cpu_coattention import decode_attention

        use_threads(self.threads)
        g = self.group
        for heads, kwargs in self._kernel_runs(layer, query_scale):
            rows = slice(heads.start * g, heads.stop * g)
            decode_attention(
                query[:, rows],
                pages[:, self.pool_start + heads.start : self.pool_start + heads.stop],
                step.block_table, step.seq_lens, step.query_start_loc,
                out=out[:, rows], **kwargs,
            )
        CALLS["verify" if step.tokens > step.seq_lens.shape[0] else "decode"] += 1


class PinnedBuffers:
    """The CPU heads' queries and outputs of one layer call on the host
    (CUDA), one pair per process, allocated at startup: layers run one after
    the other, and a layer's copies have completed before the next layer
    writes either buffer (it waits for its own later query copy first)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.query = self.output = torch.empty(0, dtype=torch.uint8)
        self.queries_copied: torch.cuda.Event | None = None

    def reserve(self, nbytes: int) -> None:
        if nbytes > self.nbytes:
            self.query, self.output = (
                torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2))
            self.nbytes = nbytes
            self.queries_copied = torch.cuda.Event()

    @staticmethod
    def view(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        numel = shape[0] * shape[1] * shape[2]
        return buffer[: numel * dtype.itemsize].view(dtype).view(shape)


pinned = PinnedBuffers()


def reserve_pinned(vllm_config, num_heads: int, head_size: int) -> None:
    """Room for the largest short-query step: every request with its most
    query tokens, all query heads (of at most 4 bytes an element)."""
    from vllm_headinfer.metadata import in_place_query_len

    scheduler = vllm_config.scheduler_config
    tokens = min(scheduler.max_num_seqs * in_place_query_len(vllm_config),
                 scheduler.max_num_batched_tokens)
    pinned.reserve(tokens * num_heads * head_size * 4)


def coattend(ops, layer, query, kv_cache, pages, host, m, output) -> None:
    """One layer of a short-query step with co-attention on CUDA (the
    module docstring's steps 1-4): ``pages`` the layer's host pages,
    ``host`` their UVA view."""
    share, step = ops.impl.cpu_share, m.host_step
    t = step.tokens
    shape = (t, share.heads * share.group, query.shape[2])
    queries = pinned.view(pinned.query, query.dtype, shape)
    queries.copy_(query[:t, share.query_heads], non_blocking=True)
    pinned.queries_copied.record()
    ops.read_in_place(layer, query, kv_cache, host, m, output, share.gpu_heads)
    step.ready.synchronize()
    pinned.queries_copied.synchronize()
    out = pinned.view(pinned.output, output.dtype, shape)
    share.attend(layer, queries, pages, step, out, ops.query_scale)
    output[:t, share.query_heads].copy_(out, non_blocking=True)
