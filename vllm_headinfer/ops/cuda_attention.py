"""The CUDA data path: vLLM's flash attention on three kinds of K/V pages.

* resident heads: the layer's device pages, as vLLM's FLASH_ATTN reads them;
* offloaded heads, decode and speculative verify steps ("uva"): the pinned
  host pool read in place
  through its unified-virtual-address device view. A decode step reads each
  KV byte once, so the link is the bound and no staging is needed; addresses
  are static, so this also runs inside captured CUDA graphs. The resident
  heads' call runs at the same time on a side stream: it reads device memory
  while the offloaded call waits on the link;
* offloaded heads, steps with prefill chunks ("staged"): query tiles re-read
  K/V, so the needed blocks are first gathered into device staging, one head
  group at a time on a side stream, double-buffered against the attention of
  the previous group, with the block table remapped to the compact copy.

New K/V are written by ``reshape_and_cache_flash`` to the device pages and,
through the UVA view, straight into the host pool: no host sync, and the
writes are ordered before this step's attention on the same stream. With an
fp8 cache every kind of page holds fp8 bytes: the write quantises with the
layer's K/V scales and each call passes FLASH_ATTN's descales, sliced to the
call's heads.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backends.fa_utils import (
    flash_attn_supports_quant_query_input,
    flash_attn_varlen_func,
    get_flash_attn_version,
)

from vllm_headinfer.coattention.share import split_prefix_tokens
from vllm_headinfer.coattention.split import SHARE_STEPS
from vllm_headinfer.kv_quant import fp8_dtype
from vllm_headinfer.layout import device_kv, fa_view, host_kv
from vllm_headinfer.ops.staging import gather_pages, plan_head_groups, shared_staging

logger = init_logger("vllm.headinfer.ops.cuda_attention")


_overlap_streams: dict = {}


def overlap_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the resident heads of decode steps."""
    if device not in _overlap_streams:
        _overlap_streams[device] = torch.cuda.Stream(device=device)
    return _overlap_streams[device]


class CudaHeadAttention:
    """The CUDA data path of a layer (``impl``, HeadInferImpl); of the same
    shape as the CPU one (torch_attention.TorchHeadAttention)."""

    def __init__(self, impl) -> None:
        self.impl = impl
        self.fa_version = get_flash_attn_version(head_size=impl.head_size)
        # The settings' paths, the staging buffers and the process's
        # co-attention (coattention/runtime.py), once placed.
        self.decode_path = self.prefill_path = None
        self.staging = None
        self.coattention = None
        # An fp8 cache is read as FLASH_ATTN reads it: pages viewed as the
        # platform's fp8 type, queries quantised by the layer where flash
        # attention takes fp8 queries (all but FA4's SM90 dequantising path).
        quantized = fp8_dtype(impl.kv_cache_dtype) is not None
        self.fp8 = current_platform.fp8_dtype() if quantized else None
        self.supports_quant_query_input = flash_attn_supports_quant_query_input() and not (
            self.fa_version == 4 and current_platform.is_device_capability_family(90) and quantized
        )

    def placed(self, cfg, coattention) -> None:
        """Adopts the settings ``cfg`` and the process's co-attention, and
        takes the process's staging buffers once this layer offloads heads
        (the engine core reserved their memory when it placed them)."""
        self.decode_path = cfg.resolved_decode_path
        self.prefill_path = cfg.resolved_prefill_path
        self.coattention = coattention
        if self.impl.num_offloaded and cfg.staging_bytes and self.staging is None:
            device = torch.device("cuda", torch.cuda.current_device())
            self.staging = shared_staging(cfg.staging_bytes, device)

    def write(self, layer, key, value, kv_cache, pool, slot_mapping) -> None:
        from vllm._custom_ops import reshape_and_cache_flash

        impl = self.impl
        for k_cache, v_cache, heads, _ in impl.kv_parts(layer, kv_cache, pool, uva=True):
            reshape_and_cache_flash(
                key[:, heads],
                value[:, heads],
                k_cache.transpose(1, 2),
                v_cache.transpose(1, 2),
                slot_mapping,
                impl.kv_cache_dtype,
                layer._k_scale,
                layer._v_scale,
            )

    def forward(self, layer, query, kv_cache, pool, m, output) -> None:
        impl = self.impl
        if pool is None:
            self._attend_resident(layer, query, kv_cache, m, output, m.scheduler_metadata)
            return
        host = pool.device_layer(impl.host_layer_name(layer))
        if m.host_step is not None and impl.cpu_share is not None:
            self._coattend(layer, query, kv_cache, host, m, output)
            return
        path = self.decode_path if m.short_queries else self.prefill_path
        if path == "uva":
            self.read_in_place(layer, query, kv_cache, host, m, output, impl.num_offloaded)
            return
        self._attend_resident(layer, query, kv_cache, m, output, m.scheduler_metadata)
        if path == "staged" and self._staged(layer, query[:, impl.resident_q:], host, m,
                                             output[:, impl.resident_q:]):
            return
        self._attend_offloaded(layer, query, host, m, output, impl.num_offloaded)

    def _coattend(self, layer, query, kv_cache, host, m, output) -> None:
        """One layer of a short-query step with CPU co-attention
        (coattention/runtime.py's steps 1-4): the host's share posted, the
        GPU's read over ``host`` (the pool's UVA view), the host's share
        collected. Nothing here waits for the GPU."""
        share, step = self.impl.cpu_share, m.host_step
        call = self.coattention.post(share, query, step)
        split_part = None
        if share.split_keep:
            keep = share.split_keep
            if keep not in step.device_prefixes:
                step.device_prefixes[keep] = split_prefix_tokens(
                    m.seq_lens, m.query_start_loc, host.shape[3], keep)
            split_part = self.read_beside_split_head(layer, query, kv_cache, host, m, output,
                                                     share.gpu_heads, step.tokens, keep,
                                                     step.device_prefixes[keep])
        else:
            self.read_in_place(layer, query, kv_cache, host, m, output, share.gpu_heads)
        self.coattention.collect(call, share, step, output, split_part)

    def read_in_place(self, layer, query, kv_cache, host, m, output, heads: int) -> None:
        """The resident heads and the first ``heads`` offloaded heads, those
        read in place over ``host`` (the pool's UVA view): at the same time
        where there are both."""
        if self.impl.num_resident and heads:
            self._overlapped(layer, query, kv_cache, host, m, output, heads)
        elif heads:
            self._attend_offloaded(layer, query, host, m, output, heads)
        else:
            self._attend_resident(layer, query, kv_cache, m, output, m.scheduler_metadata)

    def _attend_resident(self, layer, query, kv_cache, m, output, plan) -> None:
        impl = self.impl
        if impl.num_resident:
            r, rq = impl.num_resident, impl.resident_q
            k, v = device_kv(kv_cache, impl.head_size)
            self._attend(layer, slice(0, r), query[:, :rq], k, v, m.block_table, m,
                         output[:, :rq], plan)

    def _attend_offloaded(self, layer, query, host, m, output, heads: int) -> None:
        """The first ``heads`` offloaded heads over ``host`` pages (a head
        slice of the pool keeps its block and page strides)."""
        impl = self.impl
        r, rq = impl.num_resident, impl.resident_q
        q = slice(rq, rq + heads * impl.group)
        k, v = host_kv(host[:, :heads])
        self._attend(layer, slice(r, r + heads), query[:, q], k, v, m.block_table, m, output[:, q])

    def attend_split_head(self, layer, query, host, m, head: int, keep: int, prefix_tokens, dtype):
        """The GPU's part of CPU co-attention's split head, the offloaded
        head ``head`` (of ``host``, the pool's UVA view): the first
        ``prefix_tokens`` of each request (``keep`` sixteenths of its blocks
        at most), which precede all its queries (so no causal mask). Returns
        the output ``[tokens, G, D]`` in ``dtype`` and its log-sum-exps
        ``[G, tokens]``. Flash attention picks its own split count: the
        result is merged with the CPU's part, not compared with one
        FLASH_ATTN call bit for bit."""
        impl = self.impl
        kv = impl.num_resident + head
        q = query[:, kv * impl.group : (kv + 1) * impl.group]
        k, v = host_kv(host[:, head : head + 1])
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        # Flash attention sizes its KV splits by max_seqlen_k: with the
        # whole context's length, a short prefix would fall to the first few
        # splits and be read by a few thread blocks.
        block_size = host.shape[3]
        longest = cdiv(m.max_seq_len, block_size) * keep // SHARE_STEPS * block_size
        return self._attend(layer, slice(kv, kv + 1), q, k, v, m.block_table, m, out,
                            seqused_k=prefix_tokens, max_seqlen_k=max(1, longest), causal=False,
                            scheduler_metadata=None, num_splits=0, return_softmax_lse=True)

    def read_beside_split_head(self, layer, query, kv_cache, host, m, output, heads: int,
                               tokens: int, keep: int, prefix_tokens):
        """``read_in_place`` and, on the side stream at the same time,
        ``attend_split_head`` of head ``heads`` over the first ``tokens``
        queries (its output and log-sum-exps returned). After the whole
        heads' call, alone, the split part is a one-head call: too few
        thread blocks to keep the link's reads in flight."""
        main = torch.cuda.current_stream()
        side = overlap_stream(query.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            parts = self.attend_split_head(layer, query[:tokens], host, m, heads, keep,
                                           prefix_tokens, output.dtype)
        self.read_in_place(layer, query, kv_cache, host, m, output, heads)
        main.wait_stream(side)
        for part in parts:  # allocated on the side stream, read on this one
            part.record_stream(main)
        return parts

    def _overlapped(self, layer, query, kv_cache, host, m, output, heads: int) -> None:
        """Resident and offloaded heads at the same time: the offloaded call
        waits on the link while the resident one reads device memory, so the
        resident heads cost (almost) nothing next to it. Heads are disjoint;
        the resident call gets its own copy of the split plan, which FA3 may
        use as scratch (a tile counter) while a call runs. Streams fork and
        join inside the step, so this is captured into CUDA graphs as is."""
        main = torch.cuda.current_stream()
        plan = m.scheduler_metadata
        side_plan = None if plan is None else plan.clone()
        side = overlap_stream(query.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._attend_resident(layer, query, kv_cache, m, output, side_plan)
        self._attend_offloaded(layer, query, host, m, output, heads)
        main.wait_stream(side)

    def query_scale(self, layer) -> float:
        """The scale of the queries the layer hands over: fp8 queries are
        the model's divided by it."""
        quantized = self.fp8 is not None and self.supports_quant_query_input
        return float(layer._q_scale) if quantized else 1.0

    def _descales(self, layer, kv_heads: slice, m) -> dict:
        """FLASH_ATTN's q/k/v descales (``[requests, KV heads]``) for the KV
        heads ``kv_heads`` of the layer; none for a plain cache."""
        if self.fp8 is None:
            return {}
        shape = (m.query_start_loc.shape[0] - 1, self.impl.num_kv_heads)
        q = layer._q_scale.expand(shape)[:, kv_heads] if self.supports_quant_query_input else None
        return {
            "q_descale": q,
            "k_descale": layer._k_scale.expand(shape)[:, kv_heads],
            "v_descale": layer._v_scale.expand(shape)[:, kv_heads],
        }

    def _attend(self, layer, kv_heads, q, k, v, block_table, m, out, plan=None, **overrides):
        """Flash attention of ``q`` over paged K/V ``[blocks, heads, N, D]``
        (the layer's KV heads ``kv_heads``), with the split count of
        FLASH_ATTN's call and the all-heads plan for it
        (``m.scheduler_metadata`` unless ``plan`` is given), so that each
        head is split and reduced as in that one call; ``overrides``
        replace arguments (a split head's part)."""
        if self.fp8 is not None:
            k, v = k.view(self.fp8), v.view(self.fp8)
        arguments = dict(
            q=q,
            k=fa_view(k),
            v=fa_view(v),
            out=out,
            cu_seqlens_q=m.query_start_loc,
            max_seqlen_q=m.max_query_len,
            seqused_k=m.seq_lens,
            max_seqlen_k=m.max_seq_len,
            softmax_scale=self.impl.scale,
            causal=True,
            block_table=block_table,
            fa_version=self.fa_version,
            scheduler_metadata=m.scheduler_metadata if plan is None else plan,
            num_splits=m.num_splits,
            **self._descales(layer, kv_heads, m),
        )
        return flash_attn_varlen_func(**{**arguments, **overrides})

    def _staged(self, layer, q, host, m, out) -> bool:
        """Attention of the offloaded heads over staged copies; False when a
        single head's blocks exceed a staging buffer (then UVA serves it)."""
        impl, staging = self.impl, self.staging
        page = host.shape[2:]  # one head's K and V planes of a block
        max_blocks = cdiv(m.max_seq_len, page[1])
        ids = m.block_table[: m.num_reqs, :max_blocks].reshape(-1)
        num_ids = ids.numel()
        per_head = num_ids * host[0, 0].numel() * host.element_size()
        groups = plan_head_groups(impl.num_offloaded, per_head, staging.bytes_per_buffer)
        if groups is None:
            logger.warning_once(
                "HEADINFER: one head of this batch's blocks (%.0f MiB) exceeds a "
                "staging buffer (%.0f MiB); prefill reads host memory in place, "
                "which is much slower. Raise additional_config.headinfer."
                "staging_mib or lower max_num_batched_tokens.",
                per_head / (1 << 20),
                staging.bytes_per_buffer / (1 << 20),
            )
            return False
        remapped = torch.arange(num_ids, dtype=torch.int32, device=q.device).view(
            m.num_reqs, max_blocks
        )
        main, side = torch.cuda.current_stream(), staging.stream
        # The gathers must see this step's K/V, written on the main stream.
        side.wait_stream(main)
        ids.record_stream(side)
        shape = lambda g: (num_ids, g[1] - g[0], *page)  # noqa: E731

        def copy_group(index: int) -> None:
            group, buf = groups[index], index % 2
            with torch.cuda.stream(side):
                side.wait_event(staging.free[buf])
                dst = staging.view(buf, shape(group), host.dtype)
                gather_pages(host[:, group[0] : group[1]], ids, dst)
                staging.ready[buf].record(side)

        copy_group(0)
        g, r = impl.group, impl.num_resident
        for index, group in enumerate(groups):
            if index + 1 < len(groups):
                copy_group(index + 1)
            buf = index % 2
            main.wait_event(staging.ready[buf])
            k, v = host_kv(staging.view(buf, shape(group), host.dtype))
            heads = slice(group[0] * g, group[1] * g)
            self._attend(layer, slice(r + group[0], r + group[1]), q[:, heads], k, v,
                         remapped, m, out[:, heads])
            staging.free[buf].record(main)
        return True
