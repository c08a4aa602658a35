"""CPU decode attention straight from the host pool's pages.

The data path for CPU co-attention: where the host's memory is faster than
the PCIe link, CPU threads attend a share of the offloaded heads in place
while the GPU reads the rest. This module is the kernel: exact attention of
short queries (decode steps, and speculative verify steps of a few tokens per
request) over one layer's host pages ``[blocks, H_off, 2, N, D]`` (layout.py),
for bf16, fp16, fp32 and fp8 (e4m3, e5m2; with the layer's K/V scales)
pages. It releases the GIL, so a Python thread can run it while the
calling thread goes on.

It is written with numba (a dependency of vLLM itself, so nothing to compile
at install time): per (request, KV head, KV split) a thread reads each K and V
row once for all query heads of the GQA group and all query tokens of the
request, converts it to fp32, and keeps an online softmax per query in fp32;
splits of one (request, head) are merged by log-sum-exp. Query tokens are
causal: query ``i`` of a request with ``q`` query tokens and ``L`` tokens of
context sees positions ``< L - q + i + 1``.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

# Pages are read as raw 16-bit words for bf16 and fp16 (numpy has no bf16),
# fp8 pages as bytes through a table of their 256 values.
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FP8 = 3
# Blocks of context per split: long contexts spread over threads, short
# ones stay in one split (a split costs a merge).
BLOCKS_PER_SPLIT = 64


@numba.njit(inline="always")
def _half_to_float(bits):
    """IEEE fp16 bits (as an integer) to a float32 value."""
    sign = -1.0 if bits & 0x8000 else 1.0
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0:
        return sign * mantissa * 5.960464477539063e-08  # 2**-24
    if exponent == 31:
        return sign * np.inf if mantissa == 0 else np.nan
    return sign * (1.0 + mantissa / 1024.0) * 2.0 ** (exponent - 15)


@numba.njit(inline="always")
def _load_row(pages, block, head, plane, token, code, row, bits, fp8_values, scales):
    """One K or V row of the pool as float32 into ``row``."""
    d = row.shape[0]
    if code == FP8:
        scale = scales[plane]
        for i in range(d):
            row[i] = fp8_values[np.uint8(pages[block, head, plane, token, i])] * scale
    elif code == 0:
        for i in range(d):
            row[i] = pages[block, head, plane, token, i]
    elif code == 1:
        for i in range(d):
            bits[i] = np.uint32(np.uint16(pages[block, head, plane, token, i])) << np.uint32(16)
        as_float = bits.view(np.float32)
        for i in range(d):
            row[i] = as_float[i]
    else:
        for i in range(d):
            row[i] = _half_to_float(np.int64(np.uint16(pages[block, head, plane, token, i])))


# Reassociation lets the dot products vectorise (2x measured); -inf and
# NaN keep their meaning (masked positions and empty splits rely on -inf).
@numba.njit(parallel=True, fastmath={"reassoc", "contract", "nsz"}, cache=True, nogil=True)
def _attend(q, pages, code, fp8_values, scales, block_table, seq_lens, query_start, scale, splits,
            m_out, l_out, acc_out):
    """Partial softmax state of every (request, head, split): running max
    ``m_out[item, qi, g]``, sum ``l_out`` and unnormalised output ``acc_out``."""
    num_reqs = seq_lens.shape[0]
    heads = pages.shape[1]
    block_size = pages.shape[3]
    dim = pages.shape[4]
    group = q.shape[2]
    for item in numba.prange(num_reqs * heads * splits):
        r = item // (heads * splits)
        h = (item // splits) % heads
        s = item % splits
        length = seq_lens[r]
        q0 = query_start[r]
        nq = query_start[r + 1] - q0
        num_blocks = (length + block_size - 1) // block_size
        per_split = (num_blocks + splits - 1) // splits
        b_first = s * per_split
        b_end = min(num_blocks, b_first + per_split)
        k_row = np.empty(dim, np.float32)
        v_row = np.empty(dim, np.float32)
        bits = np.empty(dim, np.uint32)
        scores = np.empty((block_size, nq, group), np.float32)
        m = m_out[item]
        l_sum = l_out[item]
        acc = acc_out[item]
        m[:] = -np.inf
        l_sum[:] = 0.0
        acc[:] = 0.0
        for b in range(b_first, b_end):
            block = block_table[r, b]
            in_block = min(block_size, length - b * block_size)
            # Scores of this block's tokens for every query, then one
            # rescale of the running state per block.
            for t in range(in_block):
                _load_row(pages, block, h, 0, t, code, k_row, bits, fp8_values, scales)
                pos = b * block_size + t
                for qi in range(nq):
                    visible = pos < length - nq + qi + 1
                    for g in range(group):
                        if visible:
                            dot = np.float32(0.0)
                            for i in range(dim):
                                dot += q[q0 + qi, h, g, i] * k_row[i]
                            scores[t, qi, g] = dot * scale
                        else:
                            scores[t, qi, g] = -np.inf
            for qi in range(nq):
                for g in range(group):
                    block_max = -np.inf
                    for t in range(in_block):
                        block_max = max(block_max, scores[t, qi, g])
                    if block_max == -np.inf:
                        continue
                    new_max = max(m[qi, g], block_max)
                    correction = math.exp(m[qi, g] - new_max)
                    l_sum[qi, g] *= correction
                    for i in range(dim):
                        acc[qi, g, i] *= correction
                    m[qi, g] = new_max
                    for t in range(in_block):
                        scores[t, qi, g] = math.exp(scores[t, qi, g] - new_max)
                        l_sum[qi, g] += scores[t, qi, g]
            for t in range(in_block):
                _load_row(pages, block, h, 1, t, code, v_row, bits, fp8_values, scales)
                for qi in range(nq):
                    for g in range(group):
                        w = scores[t, qi, g]
                        if w > 0.0:
                            for i in range(dim):
                                acc[qi, g, i] += w * v_row[i]


@numba.njit(parallel=True, cache=True, nogil=True)
def _merge(m_part, l_part, acc_part, seq_lens, query_start, heads, splits, out):
    """Combines the splits of every (request, head) into ``out``."""
    num_reqs = seq_lens.shape[0]
    group = out.shape[2]
    dim = out.shape[3]
    for rh in numba.prange(num_reqs * heads):
        r = rh // heads
        h = rh % heads
        q0 = query_start[r]
        nq = query_start[r + 1] - q0
        first = rh * splits
        for qi in range(nq):
            for g in range(group):
                top = -np.inf
                for s in range(splits):
                    top = max(top, m_part[first + s, qi, g])
                total = 0.0
                for i in range(dim):
                    out[q0 + qi, h, g, i] = 0.0
                if top == -np.inf:
                    continue
                for s in range(splits):
                    weight = math.exp(m_part[first + s, qi, g] - top)
                    total += l_part[first + s, qi, g] * weight
                    for i in range(dim):
                        out[q0 + qi, h, g, i] += acc_part[first + s, qi, g, i] * weight
                for i in range(dim):
                    out[q0 + qi, h, g, i] /= total


def _raw(pages: torch.Tensor) -> np.ndarray:
    if pages.dtype in (torch.float32, torch.uint8):
        return pages.numpy()
    return pages.view(torch.int16).numpy()


_NO_TABLE = np.zeros(1, np.float32)


def _fp8_values(fp8: torch.dtype) -> np.ndarray:
    """The value of every byte in the fp8 format ``fp8``."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).float().numpy()


def decode_attention(
    query: torch.Tensor,
    pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    fp8: torch.dtype | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Exact attention of short queries over one layer's host pages.

    ``query`` ``[tokens, H_off * G, D]`` (the query heads of the pages' KV
    heads, in order), ``pages`` ``[blocks, H_off, 2, N, D]`` in host memory,
    ``block_table`` ``[requests, max_blocks]``, ``seq_lens`` ``[requests]``
    (context including this step's tokens), ``query_start_loc``
    ``[requests + 1]``; writes ``out`` ``[tokens, H_off * G, D]``. All on the
    CPU. Pages of an fp8 cache are ``uint8`` bytes in the format ``fp8``,
    read as value times ``k_scale`` (K) or ``v_scale`` (V).
    """
    if fp8 is not None:
        if pages.dtype != torch.uint8:
            raise TypeError(f"fp8 pages are uint8 bytes, not {pages.dtype}")
        code, values = FP8, _fp8_values(fp8)
    elif pages.dtype in _CODES:
        code, values = _CODES[pages.dtype], _NO_TABLE
    else:
        raise TypeError(f"CPU co-attention reads fp32, bf16, fp16 or fp8 pages, not {pages.dtype}")
    heads, dim = pages.shape[1], pages.shape[4]
    tokens = query.shape[0]
    group = query.shape[1] // heads
    q = query.reshape(tokens, heads, group, dim).to(torch.float32).numpy()
    seqs = seq_lens.to(torch.int64).numpy()
    starts = query_start_loc.to(torch.int64).numpy()
    table = block_table.to(torch.int64).numpy()
    num_reqs = seqs.shape[0]
    max_q = int((starts[1:] - starts[:-1]).max()) if num_reqs else 0
    longest = int(seqs.max()) if num_reqs else 0
    splits = max(1, math.ceil(math.ceil(longest / pages.shape[3]) / BLOCKS_PER_SPLIT))
    items = num_reqs * heads * splits
    m_part = np.empty((items, max_q, group), np.float32)
    l_part = np.empty((items, max_q, group), np.float32)
    acc_part = np.empty((items, max_q, group, dim), np.float32)
    scales = np.array([k_scale, v_scale], np.float32)
    _attend(q, _raw(pages), code, values, scales, table, seqs, starts, np.float32(scale),
            splits, m_part, l_part, acc_part)
    result = np.empty((tokens, heads, group, dim), np.float32)
    _merge(m_part, l_part, acc_part, seqs, starts, heads, splits, result)
    out.copy_(torch.from_numpy(result).reshape(tokens, heads * group, dim))
