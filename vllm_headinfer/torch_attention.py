"""Paged KV writes and exact paged attention in plain torch.

This is the path on CPU and the oracle the CUDA path is checked against. A
cache is ``[blocks, heads, block_size, D + Dv]`` with K and V concatenated in
the last dimension (vLLM's generic page layout); the device half and the host
half of a layer have the same shape apart from the head count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_paged(
    cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Stores token t's ``key[t]``/``value[t]`` at slot ``slot_mapping[t]``
    (block = slot // block_size, offset = slot % block_size); slot -1 is
    padding and is skipped."""
    n = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    block_size, head_size = cache.shape[2], key.shape[-1]
    blocks, offsets = slots // block_size, slots % block_size
    cache[blocks, :, offsets, :head_size] = key[:n][valid].to(cache.dtype)
    cache[blocks, :, offsets, head_size:] = value[:n][valid].to(cache.dtype)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int, head_size: int):
    """K and V of the first ``num_tokens`` tokens stored in ``block_ids``,
    each ``[batch, heads, num_tokens, D]``; ``block_ids`` is ``[batch, n]``."""
    pages = cache[block_ids]  # [batch, n, heads, block_size, C]
    batch, n, heads, block_size, width = pages.shape
    seq = pages.permute(0, 2, 1, 3, 4).reshape(batch, heads, n * block_size, width)
    seq = seq[:, :, :num_tokens]
    return seq[..., :head_size], seq[..., head_size:]


def paged_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    output: torch.Tensor,
) -> None:
    """Causal attention of ``query`` ``[T, Hq, D]`` over the paged ``cache``;
    writes ``output`` ``[T, Hq, Dv]``. Request r owns query rows
    ``query_start_loc[r]:query_start_loc[r+1]``, the last rows of its
    ``seq_lens[r]`` tokens (bottom-right aligned causal mask)."""
    block_size = cache.shape[2]
    head_size = query.shape[-1]
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
        k, v = _gather(cache, block_table[idx, :n_blocks], kv_len, head_size)
        mask = torch.arange(kv_len)[None, :] < torch.tensor([lens[r] for r in decodes])[:, None]
        q = query[rows].unsqueeze(2)  # [batch, Hq, 1, D]
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None, None, :],
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
        k, v = _gather(cache, block_table[r : r + 1, :n_blocks], kv_len, head_size)
        q = query[starts[r] : starts[r + 1]].transpose(0, 1).unsqueeze(0)
        # Row i of the chunk sees the context before the chunk and rows <= i.
        q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
        mask = torch.arange(kv_len)[None, :] <= q_pos
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=True
        )
        output[starts[r] : starts[r + 1]] = out[0].transpose(0, 1).to(output.dtype)
