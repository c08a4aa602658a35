"""Paged KV writes and exact paged attention in plain torch.

This is the path on CPU (``TorchHeadAttention``, the CPU platform's data
path) and the oracle the CUDA path is checked against. Caches are K and V
views ``[blocks, heads, block_size, D]`` (see layout.py for how the device and
host pages hold them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_headinfer.coattention.share import merge_split_head, split_prefix_tokens
from vllm_headinfer.kv_quant import Fp8Scales, dequantize, quantize
from vllm_headinfer.layout import host_kv


def write_paged(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    fp8: Fp8Scales | None = None,
) -> None:
    """Stores token t's ``key[t]``/``value[t]`` (``[T, heads, D]``) at slot
    ``slot_mapping[t]`` (block = slot // block_size, offset = slot %
    block_size), quantised with ``fp8``'s scales if given; slot -1 is padding
    and is skipped."""
    n = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    key, value = key[:n][valid], value[:n][valid]
    if fp8 is not None:
        key, value = quantize(key, fp8.k, fp8.dtype, 1), quantize(value, fp8.v, fp8.dtype, 1)
    k_cache[blocks, :, offsets] = key.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = value.to(v_cache.dtype)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` tokens stored in ``block_ids`` (``[batch, n]``)
    as ``[batch, heads, num_tokens, D]``."""
    pages = cache[block_ids]  # [batch, n, heads, block_size, D]
    batch, n, heads, block_size, width = pages.shape
    seq = pages.permute(0, 2, 1, 3, 4).reshape(batch, heads, n * block_size, width)
    return seq[:, :, :num_tokens]


def _gather_kv(k_cache, v_cache, block_ids, num_tokens, dtype, fp8: Fp8Scales | None):
    """K and V of those tokens in ``dtype``, fp8 pages dequantised."""
    k, v = _gather(k_cache, block_ids, num_tokens), _gather(v_cache, block_ids, num_tokens)
    if fp8 is None:
        return k.to(dtype), v.to(dtype)
    return dequantize(k, fp8.k, fp8.dtype, 1, dtype), dequantize(v, fp8.v, fp8.dtype, 1, dtype)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    output: torch.Tensor,
    fp8: Fp8Scales | None = None,
) -> None:
    """Causal attention of ``query`` ``[T, Hq, D]`` over the paged caches
    (fp8 pages dequantised with ``fp8``'s scales); writes ``output``
    ``[T, Hq, Dv]``. Request r owns query rows
    ``query_start_loc[r]:query_start_loc[r+1]``, the last rows of its
    ``seq_lens[r]`` tokens (bottom-right aligned causal mask)."""
    block_size = k_cache.shape[2]
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]

    # Decodes (one query row each) run as one padded batch.
    decodes = [r for r, q in enumerate(q_lens) if q == 1]
    if decodes:
        idx = torch.tensor(decodes)
        rows = torch.tensor([starts[r] for r in decodes])
        kv_len = max(lens[r] for r in decodes)
        n_blocks = -(-kv_len // block_size)
        ids = block_table[idx, :n_blocks]
        k, v = _gather_kv(k_cache, v_cache, ids, kv_len, query.dtype, fp8)
        mask = torch.arange(kv_len)[None, :] < torch.tensor([lens[r] for r in decodes])[:, None]
        q = query[rows].unsqueeze(2)  # [batch, Hq, 1, D]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :],
            scale=scale, enable_gqa=True,
        )
        output[rows] = out.squeeze(2).to(output.dtype)

    # Prefill chunks one request at a time: a padded batch would cost
    # [batch, heads, q_len, kv_len] scores.
    for r, q_len in enumerate(q_lens):
        if q_len <= 1:
            continue
        kv_len = lens[r]
        n_blocks = -(-kv_len // block_size)
        ids = block_table[r : r + 1, :n_blocks]
        k, v = _gather_kv(k_cache, v_cache, ids, kv_len, query.dtype, fp8)
        q = query[starts[r] : starts[r + 1]].transpose(0, 1).unsqueeze(0)
        # Row i of the chunk sees the context before the chunk and rows <= i.
        q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
        mask = torch.arange(kv_len)[None, :] <= q_pos
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
        )
        output[starts[r] : starts[r + 1]] = out[0].transpose(0, 1).to(output.dtype)


def prefix_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
    output: torch.Tensor,
    lse: torch.Tensor,
    fp8: Fp8Scales | None = None,
) -> None:
    """Attention of request r's query rows over the first ``prefix_lens[r]``
    tokens of its context, all visible to every row (they precede its
    queries): writes ``output`` ``[T, Hq, D]`` and the log-sum-exps ``lse``
    ``[Hq, T]`` (natural log; -inf and a zero output for an empty prefix),
    in float32 before rounding to ``output``'s dtype."""
    block_size = k_cache.shape[2]
    starts = query_start_loc.tolist()
    for r, length in enumerate(prefix_lens.tolist()):
        rows = slice(starts[r], starts[r + 1])
        if length == 0:
            output[rows] = 0
            lse[:, rows] = -torch.inf
            continue
        ids = block_table[r : r + 1, : -(-length // block_size)]
        k, v = _gather_kv(k_cache, v_cache, ids, length, torch.float32, fp8)
        group = query.shape[1] // k.shape[1]
        k, v = k[0].repeat_interleave(group, 0), v[0].repeat_interleave(group, 0)
        q = query[rows].float().transpose(0, 1)  # [Hq, rows, D]
        scores = q @ k.transpose(1, 2) * scale
        lse[:, rows] = torch.logsumexp(scores, -1)
        output[rows] = (torch.softmax(scores, -1) @ v).transpose(0, 1).to(output.dtype)


class TorchHeadAttention:
    """The CPU platform's data path of a layer (``impl``, HeadInferImpl):
    each part of its heads (``impl.kv_parts``) by the torch functions above,
    and in short-query steps with CPU co-attention the share's heads by the
    kernel in the calling thread. Of the same shape as the CUDA path
    (cuda_attention.CudaHeadAttention)."""

    # The attention layer hands over the model's queries: K/V of an fp8
    # cache are dequantised.
    supports_quant_query_input = False

    def __init__(self, impl) -> None:
        self.impl = impl

    def placed(self, cfg, coattention) -> None:
        """Nothing to take: no staging, and co-attention runs in this
        thread."""

    def query_scale(self, layer) -> float:
        return 1.0

    def write(self, layer, key, value, kv_cache, pool, slot_mapping) -> None:
        impl = self.impl
        for k_cache, v_cache, kv_heads, _ in impl.kv_parts(layer, kv_cache, pool, uva=False):
            write_paged(
                k_cache, v_cache, key[:, kv_heads], value[:, kv_heads], slot_mapping,
                Fp8Scales.of(layer, impl.kv_cache_dtype, kv_heads),
            )

    def forward(self, layer, query, kv_cache, pool, m, output) -> None:
        impl = self.impl
        share = impl.cpu_share if m.host_step is not None else None
        cpu_heads = share.heads if share is not None else 0
        seq_lens = m.seq_lens_cpu if m.seq_lens_cpu is not None else m.seq_lens.cpu()
        for k_cache, v_cache, kv_heads, heads in impl.kv_parts(layer, kv_cache, pool, False,
                                                               cpu_heads):
            paged_attention(
                query[:, heads],
                k_cache,
                v_cache,
                m.block_table,
                m.query_start_loc_cpu,
                seq_lens,
                impl.scale,
                output[:, heads],
                Fp8Scales.of(layer, impl.kv_cache_dtype, kv_heads),
            )
        if share is not None:
            self._coattend(layer, query, pool.layer(impl.host_layer_name(layer)), m, output,
                           share)

    def _coattend(self, layer, query, pages, m, output, share) -> None:
        """CPU co-attention's heads: the kernel's share, and a split head's
        first blocks by ``prefix_attention`` (the GPU's part on CUDA),
        merged as on CUDA."""
        impl = self.impl
        step, g = m.host_step, impl.group
        t, dim = step.tokens, query.shape[2]
        split_out = split_lse = None
        if share.split_keep:
            split_out = torch.empty(t, g, dim, dtype=output.dtype)
            split_lse = torch.empty(g, t, dtype=torch.float32)
        share.attend(layer, query[:t, share.query_heads], pages, step,
                     output[:t, share.whole_query_heads], split_out=split_out, split_lse=split_lse)
        if share.split_keep:
            head = share.gpu_heads
            kv = impl.num_resident + head
            prefix = split_prefix_tokens(step.seq_lens, step.query_start_loc, pages.shape[3],
                                         share.split_keep)
            gpu_out, gpu_lse = torch.empty_like(split_out), torch.empty_like(split_lse)
            prefix_attention(query[:t, share.split_query_heads], *host_kv(pages[:, head : head + 1]),
                             step.block_table, step.query_start_loc, prefix, impl.scale, gpu_out,
                             gpu_lse, Fp8Scales.of(layer, impl.kv_cache_dtype, slice(kv, kv + 1)))
            merge_split_head(output[:t, share.split_query_heads], gpu_out, gpu_lse, split_out,
                             split_lse)
