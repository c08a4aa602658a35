"""Paged KV writes and exact paged attention in plain torch.

This is the path on CPU and the oracle the CUDA path is checked against.
Caches are K and V views ``[blocks, heads, block_size, D]`` (see layout.py for
how the device and host pages hold them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_paged(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Stores token t's ``key[t]``/``value[t]`` at slot ``slot_mapping[t]``
    (block = slot // block_size, offset = slot % block_size); slot -1 is
    padding and is skipped."""
    n = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = key[:n][valid].to(k_cache.dtype)
    v_cache[blocks, :, offsets] = value[:n][valid].to(v_cache.dtype)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` tokens stored in ``block_ids`` (``[batch, n]``)
    as ``[batch, heads, num_tokens, D]``."""
    pages = cache[block_ids]  # [batch, n, heads, block_size, D]
    batch, n, heads, block_size, width = pages.shape
    seq = pages.permute(0, 2, 1, 3, 4).reshape(batch, heads, n * block_size, width)
    return seq[:, :, :num_tokens]


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    output: torch.Tensor,
) -> None:
    """Causal attention of ``query`` ``[T, Hq, D]`` over the paged caches;
    writes ``output`` ``[T, Hq, Dv]``. Request r owns query rows
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
        k, v = _gather(k_cache, ids, kv_len), _gather(v_cache, ids, kv_len)
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
        ids = block_table[r : r + 1, :n_blocks]
        k, v = _gather(k_cache, ids, kv_len), _gather(v_cache, ids, kv_len)
        q = query[starts[r] : starts[r + 1]].transpose(0, 1).unsqueeze(0)
        # Row i of the chunk sees the context before the chunk and rows <= i.
        q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
        mask = torch.arange(kv_len)[None, :] <= q_pos
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=True
        )
        output[starts[r] : starts[r + 1]] = out[0].transpose(0, 1).to(output.dtype)
