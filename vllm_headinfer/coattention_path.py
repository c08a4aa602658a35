"""CPU co-attention in the data path: in decode and verify steps CPU threads
attend the last offloaded KV heads of a layer in host memory while the GPU
reads the others over the link.

With a CPU share of ``c`` heads (coattention_split: a multiple of 1/16) a
layer's KV heads are ``[0, R)`` resident, then offloaded: the GPU reads the
first ones whole, CPU threads attend the last ``floor(c)`` with
``cpu_coattention.decode_attention``, straight from the host pool's CPU
tensor (a head slice of its pages, read in place), and where ``c`` has a
fraction the head between them is split: the GPU attends the first blocks of
each request's context (``split_prefix_tokens``), the kernel the rest, and
vLLM's merge of partial attentions combines the two by their log-sum-exps.
Query heads follow their KV head, so each part writes its own slice of the
output.

On CUDA, per layer (``coattend``):

1. the CPU heads' queries are copied into pinned host memory on the current
   stream, and an event is recorded after the copy. This step's K/V were
   written into the pool (through its UVA view) earlier on the same stream,
   so once the event has completed the CPU reads them;
2. the GPU's attention is launched as without co-attention, over its
   narrower slice of the pool's UVA view, then its part of the split head;
3. the host waits for the event and runs the kernel into pinned output
   buffers, while the GPU reads its share;
4. those outputs are copied to the device on the current stream, and the
   split head's two parts merged.

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
from dataclasses import dataclass, field

import torch
from vllm.platforms import current_platform
from vllm.utils.math_utils import cdiv

from vllm_headinfer.coattention_split import (
    SHARE_STEPS,
    RankSplit,
    auto_split,
    kernel_threads,
    rank_cores,
)
from vllm_headinfer.config import HeadInferConfig, ranks_per_node
from vllm_headinfer.kv_quant import Fp8Scales, fp8_dtype

# Layer calls the kernel served in this process, by step kind ("decode":
# one query token per request, "verify": more); the tests' engine runner
# reports them to show the path ran.
CALLS: collections.Counter = collections.Counter()

# Auto's measurement, once per process, page format and offloaded heads.
_measured: dict[tuple, RankSplit] = {}


def rank_split(vllm_config, spec) -> RankSplit:
    """This rank's co-attention for layers of ``spec``'s page format."""
    cfg = HeadInferConfig.from_vllm_config(vllm_config)
    cores = rank_cores(len(os.sched_getaffinity(0)), ranks_per_node(vllm_config))
    threads = cfg.cpu_attention_threads if isinstance(cfg.cpu_attention_threads, int) else None
    if cfg.fixed_cpu_share is not None:
        return RankSplit(threads=threads or kernel_threads(cores), fixed=cfg.fixed_cpu_share)
    if not current_platform.is_cuda():
        return RankSplit(fixed=0)  # auto on CPU: no link to relieve
    if cfg.resolved_decode_path != "uva":
        return RankSplit(fixed=0, off_reason="decode_path is 'staged'")
    fp8 = fp8_dtype(vllm_config.cache_config.cache_dtype)
    heads = spec.num_offloaded_kv_heads
    key = (cores, threads, spec.dtype, fp8, spec.head_size, spec.block_size, heads)
    if key not in _measured:
        from vllm_headinfer.coattention_probe import measure_rates

        _measured[key] = auto_split(
            cores, threads,
            lambda t: measure_rates(t, spec.dtype, fp8, spec.head_size, spec.block_size, heads),
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
    # split_prefix_tokens on the device, by split_keep (computed once a step).
    device_prefixes: dict = field(default_factory=dict)


def split_prefix_tokens(seq_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: int,
                        keep: int) -> torch.Tensor:
    """Tokens of each request's split head that the GPU attends (int32, on
    the tensors' device, without a host sync): the first ``keep``
    sixteenths of its blocks but none holding a query position, as
    ``cpu_coattention.split_cut`` leaves them."""
    n = seq_lens.shape[0]
    query_lens = query_start_loc[1 : n + 1] - query_start_loc[:n]
    blocks = (seq_lens + block_size - 1) // block_size
    cut = torch.minimum(blocks * keep // SHARE_STEPS, (seq_lens - query_lens) // block_size)
    return (cut.clamp(min=0) * block_size).to(torch.int32)


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
    """The offloaded heads of a layer that CPU threads attend in
    short-query steps: ``share`` heads, a multiple of 1/SHARE_STEPS (the
    module docstring says how a fraction splits one more head)."""

    def __init__(self, impl, share: float, threads: int) -> None:
        h, g = impl.num_kv_heads, impl.group
        whole, part = divmod(round(share * SHARE_STEPS), SHARE_STEPS)
        # Sixteenths of each request's blocks of the split head that the
        # GPU attends; 0: no split head.
        self.split_keep = SHARE_STEPS - part if part else 0
        self.heads = whole + (1 if part else 0)  # heads the kernel reads
        self.threads = threads
        self.group = g
        self.gpu_heads = impl.num_offloaded - self.heads  # offloaded heads the GPU reads whole
        self.pool_start = self.gpu_heads  # first kernel head in the pool's pages
        self.kv_heads = slice(h - self.heads, h)
        self.query_heads = slice((h - self.heads) * g, h * g)
        split = 1 if part else 0
        self.split_query_heads = slice((h - self.heads) * g, (h - self.heads + split) * g)
        self.whole_query_heads = slice((h - whole) * g, h * g)  # the heads the CPU takes whole
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

    def attend(self, layer, query, pages, step: HostStep, out, query_scale=lambda layer: 1.0,
               split_out=None, split_lse=None):
        """The share's attention on the host: ``query`` ``[step.tokens,
        heads * G, D]``, ``pages`` the layer's host pages ``[blocks, H_off,
        2, N, D]``; ``out`` gets the heads the CPU takes whole, and a split
        head's part goes to ``split_out`` ``[tokens, G, D]`` with its
        log-sum-exps ``split_lse`` ``[G, tokens]``. ``query_scale(layer)``
        is the scale of fp8 queries (1 for plain ones)."""
        from vllm_headinfer.cpu_coattention import decode_attention

        g = self.group
        split = 1 if self.split_keep else 0
        for heads, kwargs in self._kernel_runs(layer, query_scale):
            rows = slice(heads.start * g, heads.stop * g)
            first = split if heads.start == 0 else 0  # the run holds the split head
            if first:
                kwargs = {**kwargs, "split_keep": self.split_keep, "split_out": split_out,
                          "split_lse": split_lse}
            decode_attention(
                query[:, rows],
                pages[:, self.pool_start + heads.start : self.pool_start + heads.stop],
                step.block_table, step.seq_lens, step.query_start_loc,
                out=out[:, (heads.start + first - split) * g : (heads.stop - split) * g],
                threads=self.threads, **kwargs,
            )
        CALLS["verify" if step.tokens > step.seq_lens.shape[0] else "decode"] += 1


def merge_split_head(dest, gpu_out, gpu_lse, cpu_out, cpu_lse) -> None:
    """``dest`` ``[tokens, G, D]``: a split head's two parts (outputs
    ``[tokens, G, D]``, log-sum-exps ``[G, tokens]``) merged by vLLM's merge
    of partial attentions (a CUDA kernel on the GPU, torch on the CPU),
    which gives an empty part (log-sum-exp of -inf or +inf) no weight."""
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    merged = dest if dest.is_contiguous() else torch.empty_like(cpu_out)
    merge_attn_states(merged, gpu_out, gpu_lse, cpu_out, cpu_lse)
    if merged is not dest:
        dest.copy_(merged)


class PinnedBuffers:
    """The CPU heads' queries and outputs of one layer call on the host
    (CUDA), and a split head's output and log-sum-exps, one set per process,
    allocated at startup: layers run one after the other, and a layer's
    copies have completed before the next layer writes any buffer (it waits
    for its own later query copy first)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.query = self.output = self.split = torch.empty(0, dtype=torch.uint8)
        self.queries_copied: torch.cuda.Event | None = None

    def reserve(self, nbytes: int) -> None:
        if nbytes > self.nbytes:
            self.query, self.output, self.split = (
                torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(3))
            self.nbytes = nbytes
            self.queries_copied = torch.cuda.Event()

    @staticmethod
    def view(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...],
             offset: int = 0) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        return buffer[offset : offset + numel * dtype.itemsize].view(dtype).view(shape)


pinned = PinnedBuffers()


def reserve_pinned(vllm_config, num_heads: int, head_size: int) -> None:
    """Room for the largest short-query step: every request with its most
    query tokens, all query heads (of at most 4 bytes an element), and per
    token a log-sum-exp of each query head."""
    from vllm_headinfer.metadata import in_place_query_len

    scheduler = vllm_config.scheduler_config
    tokens = min(scheduler.max_num_seqs * in_place_query_len(vllm_config),
                 scheduler.max_num_batched_tokens)
    pinned.reserve(tokens * num_heads * (head_size + 1) * 4)


def coattend(ops, layer, query, kv_cache, pages, host, m, output) -> None:
    """One layer of a short-query step with co-attention on CUDA (the
    module docstring's steps 1-4): ``pages`` the layer's host pages,
    ``host`` their UVA view."""
    share, step = ops.impl.cpu_share, m.host_step
    t, g, dim = step.tokens, share.group, query.shape[2]
    split = 1 if share.split_keep else 0
    queries = pinned.view(pinned.query, query.dtype, (t, share.heads * g, dim))
    queries.copy_(query[:t, share.query_heads], non_blocking=True)
    pinned.queries_copied.record()
    ops.read_in_place(layer, query, kv_cache, host, m, output, share.gpu_heads)
    if split:
        keep = share.split_keep
        if keep not in step.device_prefixes:
            step.device_prefixes[keep] = split_prefix_tokens(
                m.seq_lens, m.query_start_loc, pages.shape[3], keep)
        gpu_out, gpu_lse = ops.attend_split_head(layer, query[:t], host, m, share.gpu_heads, keep,
                                                 step.device_prefixes[keep], output.dtype)
    step.ready.synchronize()
    pinned.queries_copied.synchronize()
    out = pinned.view(pinned.output, output.dtype, (t, (share.heads - split) * g, dim))
    split_out = split_lse = None
    if split:
        split_out = pinned.view(pinned.split, output.dtype, (t, g, dim))
        split_lse = pinned.view(pinned.split, torch.float32, (g, t), offset=split_out.nbytes)
    share.attend(layer, queries, pages, step, out, ops.query_scale, split_out, split_lse)
    output[:t, share.whole_query_heads].copy_(out, non_blocking=True)
    if split:
        device = output.device
        merge_split_head(output[:t, share.split_query_heads], gpu_out, gpu_lse,
                         split_out.to(device, non_blocking=True),
                         split_lse.to(device, non_blocking=True))
