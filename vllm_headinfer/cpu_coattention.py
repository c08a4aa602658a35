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
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

# Page formats: read as float32, as raw 16-bit words for bf16 and fp16
# (numpy has no bf16), as bytes for fp8.
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e5m2: 3,
          torch.float8_e4m3fn: 4}
# Blocks of context per split: long contexts spread over threads, short
# ones stay in one split (a split costs a merge).
BLOCKS_PER_SPLIT = 64


@intrinsic
def _prefetch(typingctx, array, index):
    """A hint to fetch ``array[index]``'s cache line: the next block of
    context is a random page of the pool, so the hardware prefetcher cannot
    guess it, while the current block's arithmetic leaves the memory idle."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array_value = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, array_value, [args[1]],
                                           wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        # read, high locality, data cache
        builder.call(function, [builder.bitcast(pointer, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@numba.njit(inline="always")
def _widen(raw, shift, rescale, sign, special, mantissa, scale, bits, values):
    """Sign-exponent-mantissa words (fp16, fp8) to float32 times ``scale``,
    in two branch-free passes LLVM vectorises. The exponent and mantissa
    shifted left by ``shift`` into float32's fields read as the value times
    2**(bias of the format - bias of float32), subnormals included, which
    ``rescale`` undoes; words with every ``special`` bit set are infinities
    (``mantissa`` bits clear, where the format has them) or NaNs."""
    magnitude = sign - np.uint32(1)
    for i in range(raw.shape[0]):
        bits[i] = (np.uint32(raw[i]) & magnitude) << shift
    for i in range(raw.shape[0]):
        word = np.uint32(raw[i])
        value = values[i] * rescale
        if word & special == special:
            infinite = mantissa != 0 and word & mantissa == 0
            value = np.float32(np.inf) if infinite else np.float32(np.nan)
        values[i] = (-value if word & sign else value) * scale


_U32 = np.uint32


@numba.njit(inline="always")
def _to_float(raw, code, scale, bits, values):
    """``raw`` (one K or V page of a block: contiguous) as float32 times
    ``scale`` (fp8 only) into ``values`` (``bits`` is its uint32 view). The
    loops index slices from 0, which lets them vectorise (an offset index
    into the whole pool does not)."""
    if code == 0:
        for i in range(raw.shape[0]):
            values[i] = raw[i]
    elif code == 1:
        for i in range(raw.shape[0]):
            bits[i] = np.uint32(np.uint16(raw[i])) << np.uint32(16)
    elif code == 2:  # fp16: exponent bias 15
        _widen(raw, _U32(13), np.float32(2.0**112), _U32(0x8000), _U32(0x7C00), _U32(0x3FF),
               np.float32(1.0), bits, values)
    elif code == 3:  # fp8 e5m2: bias 15
        _widen(raw, _U32(21), np.float32(2.0**112), _U32(0x80), _U32(0x7C), _U32(0x3), scale,
               bits, values)
    else:  # fp8 e4m3fn: bias 7, no infinities, NaN with every other bit set
        _widen(raw, _U32(20), np.float32(2.0**120), _U32(0x80), _U32(0x7F), _U32(0), scale,
               bits, values)


_LOG2E = np.float32(1.4426950408889634)
_LN2 = np.float32(0.6931471805599453)


@numba.njit(inline="always", fastmath={"reassoc", "contract", "nsz"})
def _exp_scores(row, n, shift, bits):
    """``row[:n] = exp(row[:n] - shift)`` for arguments <= 0 (-inf gives 0),
    in a loop LLVM vectorises (libm's exp is called one value at a time):
    2**k * e**g with k the nearest integer to x / ln 2 and |g| <= ln 2 / 2,
    e**g by its Taylor series to g**7 (relative error about 1e-7)."""
    for t in range(n):
        y = max((row[t] - shift) * _LOG2E, np.float32(-127.0))
        k = math.floor(y + np.float32(0.5))
        g = (y - k) * _LN2
        p = np.float32(1.0 / 5040.0)
        p = p * g + np.float32(1.0 / 720.0)
        p = p * g + np.float32(1.0 / 120.0)
        p = p * g + np.float32(1.0 / 24.0)
        p = p * g + np.float32(1.0 / 6.0)
        p = p * g + np.float32(0.5)
        p = p * g + np.float32(1.0)
        p = p * g + np.float32(1.0)
        row[t] = p
        bits[t] = np.int32(k + np.float32(127.0)) << 23
    powers = bits.view(np.float32)
    for t in range(n):
        row[t] *= powers[t]


@numba.njit(inline="always", fastmath={"reassoc", "contract", "nsz"})
def _dot(a, b, dim):
    total = np.float32(0.0)
    for i in range(dim):
        total += a[i] * b[i]
    return total


# Reassociation lets the dot products vectorise; -inf and NaN keep their
# meaning (masked positions and empty splits rely on -inf).
@numba.njit(parallel=True, fastmath={"reassoc", "contract", "nsz"}, cache=True, nogil=True)
def _attend(q, flat, heads, block_stride, head_stride, block_size, code, scales,
            block_table, seq_lens, query_start, scale, splits, m_out, l_out, acc_out):
    """Partial softmax state of every (request, head, split): running max
    ``m_out[item, qi, g]``, sum ``l_out`` and unnormalised output ``acc_out``.
    ``flat`` holds the pages ``[blocks, heads, 2, block_size, dim]`` from the
    first one on, a block and a head ``block_stride`` and ``head_stride``
    elements apart (the heads may be a slice of the pool's). Per block: K and
    V pages to float32 once, then the scores of every query row, one rescale
    of the running state (exponentials in a vectorised loop), and the
    weighted V rows. Query rows (the request's query tokens times the GQA
    group) go four at a time, the last few one by one, and K and V rows four
    at a time where causality allows, so each element loaded feeds four
    multiply-adds."""
    num_reqs = seq_lens.shape[0]
    group = q.shape[2]
    dim = q.shape[3]
    page = block_size * dim
    for item in numba.prange(num_reqs * heads * splits):
        r = item // (heads * splits)
        h = (item // splits) % heads
        s = item % splits
        length = seq_lens[r]
        q0 = query_start[r]
        nq = query_start[r + 1] - q0
        rows = nq * group
        rows4 = rows - rows % 4  # rows taken four at a time
        num_blocks = (length + block_size - 1) // block_size
        per_split = (num_blocks + splits - 1) // splits
        b_first = s * per_split
        b_end = min(num_blocks, b_first + per_split)
        queries = np.empty((rows, dim), np.float32)
        for qi in range(nq):
            for g in range(group):
                src = q[q0 + qi, h, g]
                dst = queries[qi * group + g]
                for i in range(dim):
                    dst[i] = src[i] * scale
        k_bits = np.zeros(page, np.uint32)
        v_bits = np.zeros(page, np.uint32)
        k_flat = k_bits.view(np.float32)
        v_flat = v_bits.view(np.float32)
        k_rows = k_flat.reshape((block_size, dim))
        v_rows = v_flat.reshape((block_size, dim))
        scores = np.empty((rows, block_size), np.float32)
        exp_bits = np.empty(block_size, np.int32)
        m = np.full(rows, -np.inf, np.float32)
        l_sum = np.zeros(rows, np.float32)
        acc = np.zeros((rows, dim), np.float32)
        for b in range(b_first, b_end):
            if b + 1 < b_end:
                ahead = block_table[r, b + 1] * block_stride + h * head_stride
                for off in range(0, 2 * page, 32):
                    _prefetch(flat, ahead + off)
            base = block_table[r, b] * block_stride + h * head_stride
            in_block = min(block_size, length - b * block_size)
            n = in_block * dim
            _to_float(flat[base:base + n], code, scales[0], k_bits, k_flat)
            _to_float(flat[base + page:base + page + n], code, scales[1], v_bits, v_flat)
            first_pos = b * block_size
            # Four K rows at once where every query row sees all of them
            # (the whole block is before the first query's position): each
            # query element loaded feeds four K rows, each K element four
            # query rows.
            whole = 0
            if first_pos + in_block <= length - nq + 1:
                whole = in_block - in_block % 4
            for t in range(0, whole, 4):
                ka, kb, kc, kd = k_rows[t], k_rows[t + 1], k_rows[t + 2], k_rows[t + 3]
                for j in range(0, rows4, 4):
                    a0, a1, a2, a3 = queries[j], queries[j + 1], queries[j + 2], queries[j + 3]
                    d0a = d0b = d0c = d0d = d1a = d1b = d1c = d1d = np.float32(0.0)
                    d2a = d2b = d2c = d2d = d3a = d3b = d3c = d3d = np.float32(0.0)
                    for i in range(dim):
                        xa, xb, xc, xd = ka[i], kb[i], kc[i], kd[i]
                        y0, y1, y2, y3 = a0[i], a1[i], a2[i], a3[i]
                        d0a += y0 * xa
                        d0b += y0 * xb
                        d0c += y0 * xc
                        d0d += y0 * xd
                        d1a += y1 * xa
                        d1b += y1 * xb
                        d1c += y1 * xc
                        d1d += y1 * xd
                        d2a += y2 * xa
                        d2b += y2 * xb
                        d2c += y2 * xc
                        d2d += y2 * xd
                        d3a += y3 * xa
                        d3b += y3 * xb
                        d3c += y3 * xc
                        d3d += y3 * xd
                    # (Stored one by one: tuple stores into row views gave wrong
                    # scores with numba 0.65.)
                    scores[j, t] = d0a
                    scores[j, t + 1] = d0b
                    scores[j, t + 2] = d0c
                    scores[j, t + 3] = d0d
                    scores[j + 1, t] = d1a
                    scores[j + 1, t + 1] = d1b
                    scores[j + 1, t + 2] = d1c
                    scores[j + 1, t + 3] = d1d
                    scores[j + 2, t] = d2a
                    scores[j + 2, t + 1] = d2b
                    scores[j + 2, t + 2] = d2c
                    scores[j + 2, t + 3] = d2d
                    scores[j + 3, t] = d3a
                    scores[j + 3, t + 1] = d3b
                    scores[j + 3, t + 2] = d3c
                    scores[j + 3, t + 3] = d3d
                for j in range(rows4, rows):
                    for tt in range(t, t + 4):
                        scores[j, tt] = _dot(queries[j], k_rows[tt], dim)
            for t in range(whole, in_block):
                krow = k_rows[t]
                # Query qi sits at position length - nq + qi and sees
                # positions up to its own: the first query that sees t.
                seen_from = first_pos + t - (length - nq)
                for j in range(0, rows4, 4):
                    if j // group >= seen_from:  # so do the three rows after it
                        a0, a1, a2, a3 = queries[j], queries[j + 1], queries[j + 2], queries[j + 3]
                        d0 = d1 = d2 = d3 = np.float32(0.0)
                        for i in range(dim):
                            x = krow[i]
                            d0 += a0[i] * x
                            d1 += a1[i] * x
                            d2 += a2[i] * x
                            d3 += a3[i] * x
                        scores[j, t] = d0
                        scores[j + 1, t] = d1
                        scores[j + 2, t] = d2
                        scores[j + 3, t] = d3
                    else:
                        for jj in range(j, j + 4):
                            seen = jj // group >= seen_from
                            scores[jj, t] = _dot(queries[jj], krow, dim) if seen else -np.inf
                for j in range(rows4, rows):
                    seen = j // group >= seen_from
                    scores[j, t] = _dot(queries[j], krow, dim) if seen else -np.inf
            # Online softmax: rescale each row's state once per block; the
            # block's weights replace its scores.
            for j in range(rows):
                row = scores[j]
                block_max = -np.inf
                for t in range(in_block):
                    block_max = max(block_max, row[t])
                if block_max == -np.inf:
                    for t in range(in_block):
                        row[t] = 0.0
                    continue
                new_max = max(m[j], block_max)
                correction = math.exp(m[j] - new_max)
                l_sum[j] *= correction
                m[j] = new_max
                out_row = acc[j]
                for i in range(dim):
                    out_row[i] *= correction
                _exp_scores(row, in_block, new_max, exp_bits)
                for t in range(in_block):
                    l_sum[j] += row[t]
            for j in range(0, rows4, 4):
                o0 = acc[j]
                o1 = acc[j + 1]
                o2 = acc[j + 2]
                o3 = acc[j + 3]
                # Four V rows per pass: each output element is loaded
                # and stored once for four of them.
                whole = in_block - in_block % 4
                for t in range(0, whole, 4):
                    va, vb, vc, vd = v_rows[t], v_rows[t + 1], v_rows[t + 2], v_rows[t + 3]
                    p0, p1, p2, p3 = scores[j], scores[j + 1], scores[j + 2], scores[j + 3]
                    w0a, w0b, w0c, w0d = p0[t], p0[t + 1], p0[t + 2], p0[t + 3]
                    w1a, w1b, w1c, w1d = p1[t], p1[t + 1], p1[t + 2], p1[t + 3]
                    w2a, w2b, w2c, w2d = p2[t], p2[t + 1], p2[t + 2], p2[t + 3]
                    w3a, w3b, w3c, w3d = p3[t], p3[t + 1], p3[t + 2], p3[t + 3]
                    for i in range(dim):
                        ya, yb, yc, yd = va[i], vb[i], vc[i], vd[i]
                        o0[i] += w0a * ya + w0b * yb + w0c * yc + w0d * yd
                        o1[i] += w1a * ya + w1b * yb + w1c * yc + w1d * yd
                        o2[i] += w2a * ya + w2b * yb + w2c * yc + w2d * yd
                        o3[i] += w3a * ya + w3b * yb + w3c * yc + w3d * yd
                for t in range(whole, in_block):
                    w0 = scores[j, t]
                    w1 = scores[j + 1, t]
                    w2 = scores[j + 2, t]
                    w3 = scores[j + 3, t]
                    vrow = v_rows[t]
                    for i in range(dim):
                        y = vrow[i]
                        o0[i] += w0 * y
                        o1[i] += w1 * y
                        o2[i] += w2 * y
                        o3[i] += w3 * y
            for j in range(rows4, rows):
                o0 = acc[j]
                for t in range(in_block):
                    w0 = scores[j, t]
                    vrow = v_rows[t]
                    for i in range(dim):
                        o0[i] += w0 * vrow[i]
        for qi in range(nq):
            for g in range(group):
                j = qi * group + g
                m_out[item, qi, g] = m[j]
                l_out[item, qi, g] = l_sum[j]
                dst = acc_out[item, qi, g]
                src = acc[j]
                for i in range(dim):
                    dst[i] = src[i]


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


def _flat(pages: torch.Tensor) -> tuple[np.ndarray, int, int]:
    """The pages as one flat array from their first element (raw 16-bit
    words for bf16 and fp16), and the strides of a block and of a head in
    it. Each K and V page must be contiguous; the heads may be a slice."""
    blocks, heads, _, block_size, dim = pages.shape
    if pages.stride()[2:] != (block_size * dim, dim, 1):
        raise ValueError(f"K and V pages must be contiguous, got strides {pages.stride()}")
    block_stride, head_stride = pages.stride()[:2]
    span = (blocks - 1) * block_stride + (heads - 1) * head_stride + 2 * block_size * dim
    flat = pages.as_strided((span,), (1,))
    if pages.dtype not in (torch.float32, torch.uint8):
        flat = flat.view(torch.int16)
    return flat.numpy(), block_stride, head_stride


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
    if fp8 is not None and pages.dtype != torch.uint8:
        raise TypeError(f"fp8 pages are uint8 bytes, not {pages.dtype}")
    code = _CODES.get(fp8 if fp8 is not None else pages.dtype)
    if code is None:
        raise TypeError("CPU co-attention reads fp32, bf16, fp16, fp8 e4m3fn and e5m2 pages, "
                        f"not {fp8 or pages.dtype}")
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
    flat, block_stride, head_stride = _flat(pages)
    _attend(q, flat, heads, block_stride, head_stride, pages.shape[3], code, scales, table,
            seqs, starts, np.float32(scale), splits, m_part, l_part, acc_part)
    result = np.empty((tokens, heads, group, dim), np.float32)
    _merge(m_part, l_part, acc_part, seqs, starts, heads, splits, result)
    out.copy_(torch.from_numpy(result).reshape(tokens, heads * group, dim))
