"""A layer's CPU share, a step's metadata on the host, and this rank's split.

With a CPU share of ``c`` heads (split.py: a multiple of 1/16) a
layer's KV heads are ``[0, R)`` resident, then offloaded: the GPU reads the
first ones whole, CPU threads attend the last ``floor(c)`` with
``kernel.decode_attention``, straight from the host pool's CPU
tensor (a head slice of its pages, read in place), and where ``c`` has a
fraction the head between them is split: the GPU attends the first blocks of
each request's context (``split_prefix_tokens``), the kernel the rest, and
vLLM's merge of partial attentions combines the two by their log-sum-exps.
Query heads follow their KV head, so each part writes its own slice of the
output.

On CUDA the GPU's data path posts the share of each layer call to the
process's serving thread and collects it (runtime.py); on CPU (what CI runs)
an explicit ``cpu_attention`` routes the same heads through the kernel in the
calling thread (``CpuShare.attend``).

The kernel (numba) is imported only where a layer uses it (the package's
docstring says why).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from dataclasses import dataclass, field

import torch
from vllm.platforms import current_platform
from vllm.utils.math_utils import cdiv

from vllm_headinfer.coattention.host_cores import (
    cgroup_cpu_quota,
    numa_nodes,
    ranks_on_host,
    usable_cores,
)
from vllm_headinfer.coattention.split import (
    SHARE_STEPS,
    RankSplit,
    auto_split,
    kernel_threads,
    rank_cores,
)
from vllm_headinfer.config import HeadInferConfig
from vllm_headinfer.host_memory import ranks_per_node
from vllm_headinfer.kv_quant import Fp8Scales, fp8_dtype

# Layer calls the kernel served in this process, by step kind ("decode":
# one query token per request, "verify": more); the tests' engine runner
# reports them to show the path ran.
CALLS: collections.Counter = collections.Counter()

# Auto's measurement, once per process, page format and offloaded heads.
_measured: dict[tuple, RankSplit] = {}


def rank_cores_why(vllm_config) -> tuple[int, str]:
    """This rank's cores: those the affinity mask and the cgroup's CPU quota
    allow (host_cores.py), shared by the ranks of every data-parallel
    replica on the host; and why that many, for the startup line."""
    usable = usable_cores(len(os.sched_getaffinity(0)), cgroup_cpu_quota())
    ranks = ranks_on_host(ranks_per_node(vllm_config),
                          vllm_config.parallel_config.data_parallel_size_local)
    why = usable.why + (f", shared by {ranks} ranks on this host" if ranks > 1 else "")
    return rank_cores(usable.cores, ranks), why


def rank_split(vllm_config, cfg: HeadInferConfig, spec) -> RankSplit:
    """This rank's co-attention for layers of ``spec``'s page format under
    the settings ``cfg``, with why it has that many threads."""
    cores, why = rank_cores_why(vllm_config)
    threads = cfg.cpu_attention_threads if isinstance(cfg.cpu_attention_threads, int) else None
    why = ("set by cpu_attention_threads" if threads else
           f"{cores} core(s) for this rank from {why}, one left to the rank's own thread")
    nodes = numa_nodes()
    if nodes > 1:  # (host_cores.py's docstring says why not, and what to do)
        why += f"; {nodes} NUMA nodes: threads and pages are not bound to one"
    return dataclasses.replace(_rank_split(vllm_config, cfg, spec, cores, threads),
                               threads_why=why)


def _rank_split(vllm_config, cfg: HeadInferConfig, spec, cores: int,
                threads: int | None) -> RankSplit:
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
        from vllm_headinfer.coattention.probe import measure_rates

        _measured[key] = auto_split(
            cores, threads,
            lambda t: measure_rates(t, spec.dtype, fp8, spec.head_size, spec.block_size, heads),
        )
    return _measured[key]


@dataclass
class HostStep:
    """A short-query step's metadata on the host, for the kernel: on CUDA
    views of pinned buffers (``buffers``, flat) that the step's copies fill
    on the stream before the layers run."""

    block_table: torch.Tensor  # [requests, blocks]
    seq_lens: torch.Tensor  # [requests], exact: this step's tokens included
    query_start_loc: torch.Tensor  # [requests + 1]
    tokens: int  # query tokens of the step's requests (without padding)
    buffers: tuple[torch.Tensor, ...] | None = None
    # split_prefix_tokens on the device, by split_keep (computed once a step).
    device_prefixes: dict = field(default_factory=dict)


def split_prefix_tokens(seq_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: int,
                        keep: int) -> torch.Tensor:
    """Tokens of each request's split head that the GPU attends (int32, on
    the tensors' device, without a host sync): the first ``keep``
    sixteenths of its blocks but none holding a query position, as
    ``kernel.split_cut`` leaves them."""
    n = seq_lens.shape[0]
    query_lens = query_start_loc[1 : n + 1] - query_start_loc[:n]
    blocks = (seq_lens + block_size - 1) // block_size
    cut = torch.minimum(blocks * keep // SHARE_STEPS, (seq_lens - query_lens) // block_size)
    return (cut.clamp(min=0) * block_size).to(torch.int32)


class HostStepCopies:
    """Builds each short-query step's HostStep (int64, what the kernel
    reads). On CUDA the device tensors are copied into pinned buffers
    without a host sync (the serving thread reads them once the GPU has
    published the step's first call, which follows the copies on the
    stream); they are not the host copies vLLM keeps, which hold upper bounds of the
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
                        start_buf[: n + 1], tokens, self.buffers)
        step.block_table.copy_(table[:n, :blocks], non_blocking=True)
        step.seq_lens.copy_(m.seq_lens[:n], non_blocking=True)
        step.query_start_loc.copy_(m.query_start_loc[: n + 1], non_blocking=True)
        return step


class CpuShare:
    """The offloaded heads of a layer that CPU threads attend in
    short-query steps: ``share`` heads, a multiple of 1/SHARE_STEPS (the
    module docstring says how a fraction splits one more head)."""

    def __init__(self, impl, share: float, threads: int) -> None:
        self.num_kv_heads, self.offloaded = impl.num_kv_heads, impl.num_offloaded
        self.threads = threads
        self.group = impl.group
        self.scale = impl.scale
        self.kv_cache_dtype = impl.kv_cache_dtype
        self.version = -1
        # The serving thread forgets its layers when the share goes (runtime.served_entry).
        self.finalizer = None
        self.resize(share)

    def resize(self, share: float) -> None:
        """Takes ``share`` heads from the next call on (auto's split retuned
        from the engine's figures): the serving thread knows the share by
        ``key``, new with every size."""
        steps = round(share * SHARE_STEPS)
        if self.version >= 0 and steps == self.heads * SHARE_STEPS - self.split_keep:
            return  # (the same size: the serving loop keeps its entry)
        h, g = self.num_kv_heads, self.group
        whole, part = divmod(steps, SHARE_STEPS)
        # Sixteenths of each request's blocks of the split head that the
        # GPU attends; 0: no split head.
        self.split_keep = SHARE_STEPS - part if part else 0
        self.heads = whole + (1 if part else 0)  # heads the kernel reads
        self.gpu_heads = self.offloaded - self.heads  # offloaded heads the GPU reads whole
        self.pool_start = self.gpu_heads  # first kernel head in the pool's pages
        self.kv_heads = slice(h - self.heads, h)
        self.query_heads = slice((h - self.heads) * g, h * g)
        split = 1 if part else 0
        self.split_query_heads = slice((h - self.heads) * g, (h - self.heads + split) * g)
        self.whole_query_heads = slice((h - whole) * g, h * g)  # the heads the CPU takes whole
        self._arguments: dict | None = None  # (fp8 scales per head follow the heads)
        self.version += 1
        # What the serving thread knows the share by: no reference to it, so
        # that the share (and with it its engine's layers) can go.
        self.key = (id(self), self.version)

    def kernel_arguments(self, layer, query_scale) -> dict:
        """The kernel's scale arguments for this layer: the softmax scale
        (times the scale of fp8 queries) and an fp8 cache's format and K/V
        scales (one per tensor or per head). Read once: on CUDA the scales
        are device tensors."""
        if self._arguments is None:
            self._arguments = {"scale": self.scale * query_scale(layer)}
            fp8 = Fp8Scales.of(layer, self.kv_cache_dtype, self.kv_heads)
            if fp8 is not None:
                k, v = (float(s) if s.dim() == 0 else s.tolist() for s in (fp8.k, fp8.v))
                self._arguments.update(fp8=fp8.dtype, k_scale=k, v_scale=v)
        return self._arguments

    def attend(self, layer, query, pages, step: HostStep, out, split_out=None, split_lse=None):
        """The share's attention on the host, in the calling thread (the CPU
        platform's path): ``query`` ``[step.tokens, heads * G, D]``,
        ``pages`` the layer's host pages ``[blocks, H_off, 2, N, D]``;
        ``out`` gets the heads the CPU takes whole, and a split head's part
        goes to ``split_out`` ``[tokens, G, D]`` with its log-sum-exps
        ``split_lse`` ``[G, tokens]``."""
        from vllm_headinfer.coattention.kernel import decode_attention

        decode_attention(query, pages[:, self.pool_start:], step.block_table, step.seq_lens,
                         step.query_start_loc, out=out, threads=self.threads,
                         split_keep=self.split_keep, split_out=split_out, split_lse=split_lse,
                         **self.kernel_arguments(layer, lambda layer: 1.0))
        count_call(step.tokens, step.seq_lens.shape[0])


def count_call(tokens: int, requests: int) -> None:
    CALLS["verify" if tokens > requests else "decode"] += 1


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
