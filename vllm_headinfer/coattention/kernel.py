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
at install time): per (request, KV split) a thread walks the split's blocks,
every KV head of a block in turn (they lie next to each other in the pool),
reads each K and V row once for all query heads of the GQA group and all
query tokens of the request, converts it to fp32 (bf16 in registers, fp16
and fp8 through a widened copy of the page), and keeps an online softmax
per query in fp32. While a block is computed, hints fetch the same head's
pages two blocks ahead a few rows at a time. Splits of one (request, head)
are merged by log-sum-exp, by whichever thread finishes the request's last
split: one parallel region per call (waking the threads is most of what a
call costs over a short context, and short contexts wake fewer threads).
Query tokens are causal: query ``i`` of a request with ``q`` query tokens
and ``L`` tokens of context sees positions ``< L - q + i + 1``.

The first head of the pages may be a split head: the GPU attends the first
blocks of its context (``split_cut``) and the kernel the rest, and the two
partial results are merged by their log-sum-exps, which the kernel returns.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba.core import types
from numba.extending import overload

from vllm_headinfer.coattention.intrinsics import bits_to_float, fetch_add, prefetch
from vllm_headinfer.coattention.split import SHARE_STEPS

# Page formats: read as float32, as raw 16-bit words for bf16 and fp16
# (numpy has no bf16), as bytes for fp8.
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e5m2: 3,
          torch.float8_e4m3fn: 4}
# Most blocks of context per split: long contexts spread over threads in
# splits of about this size (a split costs a merge), short ones over at most
# one split per thread.
BLOCKS_PER_SPLIT = 64
# Fewest (block, head) pages per thread: a thread woken for less work costs
# more than it reads (a 16-token bf16 page of 128 dims, 8 KiB, takes a
# thread about 1.4 us on the H100 host; waking one takes several).
MIN_PAGES_PER_THREAD = 16


@numba.njit(inline="always")
def split_cut(length, query_len, block_size, keep):
    """Blocks of a split head that the GPU attends for a request of
    ``length`` tokens of context, ``query_len`` of them this step's queries:
    ``keep`` sixteenths of its blocks (rounded down), but none that holds a
    query position (every query sees all of the GPU's part, which it attends
    without a causal mask), so the kernel always has the last block. The
    torch formula in share.py computes the same on the device."""
    if keep <= 0:
        return 0
    blocks = (length + block_size - 1) // block_size
    return max(0, min(blocks * keep // SHARE_STEPS, (length - query_len) // block_size))


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
    """``raw`` (one fp16 or fp8 K or V page of a block: contiguous; bf16
    and float32 pages are read in place) as float32 times ``scale`` (fp8
    only) into ``values`` (``bits`` is its uint32 view). The loops index
    slices from 0, which lets them vectorise (an offset index into the whole
    pool does not)."""
    if code == 2:  # fp16: exponent bias 15
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
def _exp_scores(values, bits):
    """``values[:] = exp(values)`` for arguments <= 0 (-inf gives 0), in a
    loop LLVM vectorises (libm's exp is called one value at a time):
    2**k * e**g with k the nearest integer to x / ln 2 and |g| <= ln 2 / 2,
    e**g by its Taylor series to g**7 (relative error about 1e-7)."""
    n = values.shape[0]
    for t in range(n):
        y = max(values[t] * _LOG2E, np.float32(-127.0))
        k = np.floor(y + np.float32(0.5))  # (math.floor would give an integer: float64 after)
        g = (y - k) * _LN2
        p = np.float32(1.0 / 5040.0)
        p = p * g + np.float32(1.0 / 720.0)
        p = p * g + np.float32(1.0 / 120.0)
        p = p * g + np.float32(1.0 / 24.0)
        p = p * g + np.float32(1.0 / 6.0)
        p = p * g + np.float32(0.5)
        p = p * g + np.float32(1.0)
        p = p * g + np.float32(1.0)
        values[t] = p
        bits[t] = np.int32(k + np.float32(127.0)) << 23
    powers = bits.view(np.float32)
    for t in range(n):
        values[t] *= powers[t]


def _as_float(x):
    """An element of a page read in place, as float32: float32 itself, or
    a bf16 word (bf16 is the upper half of a float32)."""


@overload(_as_float)
def _as_float_impl(x):
    if isinstance(x, types.Float):
        return lambda x: np.float32(x)
    if isinstance(x, types.Integer):
        return lambda x: bits_to_float(np.uint32(np.uint16(x)) << np.uint32(16))
    return None


# Reassociation lets the dot products vectorise; -inf and NaN keep their
# meaning (masked positions and empty splits rely on -inf).
_FAST = {"reassoc", "contract", "nsz"}


@numba.njit(inline="always", fastmath=_FAST)
def _dot(a, b, dim):
    total = np.float32(0.0)
    for i in range(dim):
        total += a[i] * _as_float(b[i])
    return total


@numba.njit(inline="always")
def _prefetch_span(pool, first, end):
    """Hints for the cache lines of ``pool[first:end]``."""
    for off in range(first, end, 64 // pool.itemsize):
        prefetch(pool, off)


@numba.njit(inline="always")
def _row_max(row):
    """The largest of ``row`` (at least one element) by four independent
    running maxima: the rows are a block long, too short for LLVM's vector
    loops, and one running maximum is a chain of dependent compares.
    (Selects, not max(), which numba compiles with NaN branches.)"""
    n = row.shape[0]
    m0 = m1 = m2 = m3 = row[0]
    for t in range(0, n - n % 4, 4):
        m0 = row[t] if row[t] > m0 else m0
        m1 = row[t + 1] if row[t + 1] > m1 else m1
        m2 = row[t + 2] if row[t + 2] > m2 else m2
        m3 = row[t + 3] if row[t + 3] > m3 else m3
    for t in range(n - n % 4, n):
        m0 = row[t] if row[t] > m0 else m0
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    return m2 if m2 > m0 else m0


@numba.njit(inline="always", fastmath=_FAST)
def _softmax_step(scores, flat_scores, in_block, m, l_sum, acc, exp_bits):
    """The online softmax step of one block: its weights replace its scores
    ``[rows, block_size]`` (``flat_scores`` is the same memory in 1-D);
    columns from ``in_block`` on are set to -inf first (weight 0). A row's
    state is rescaled only when its maximum grows, which after the first
    blocks of a long context is rare. The exponentials of all rows go in
    one pass: row by row, each row's series waited for the previous one's
    (a chain of multiply-add latencies rather than their throughput)."""
    rows, width = scores.shape
    for j in range(rows):
        row = scores[j]
        for t in range(in_block, width):  # (a partial last block)
            row[t] = -np.inf
        block_max = _row_max(row)
        if block_max > m[j]:
            correction = math.exp(m[j] - block_max)
            l_sum[j] *= correction
            out_row = acc[j]
            for i in range(out_row.shape[0]):
                out_row[i] *= correction
            m[j] = block_max
        # A row that has seen nothing yet has only -inf scores: shifted by
        # 0 they give weights 0.
        shift = m[j] if m[j] > -np.inf else np.float32(0.0)
        for t in range(width):
            row[t] -= shift
    _exp_scores(flat_scores, exp_bits)
    for j in range(rows):
        row = scores[j]
        s0 = s1 = s2 = s3 = np.float32(0.0)  # (independent sums, as in _row_max)
        for t in range(0, width - width % 4, 4):
            s0 += row[t]
            s1 += row[t + 1]
            s2 += row[t + 2]
            s3 += row[t + 3]
        for t in range(width - width % 4, width):
            s0 += row[t]
        l_sum[j] += (s0 + s1) + (s2 + s3)


# Inlined: as a call, the reference counts of its eleven array arguments
# (atomic updates) cost more than a third of the block's arithmetic.
@numba.njit(inline="always", fastmath=_FAST, nogil=True)
def _block(k_rows, v_rows, in_block, start, group, queries, scores, flat_scores, exp_bits, m,
           l_sum, acc, pool, ahead):
    """One block of one KV head into the online softmax state ``m``,
    ``l_sum``, ``acc`` of its query rows (the request's query tokens times
    the GQA group, ``queries`` scaled). ``k_rows`` and ``v_rows``
    ``[block_size, dim]``: float32, or bf16 words read in place (each
    element is widened where it is used, in registers). ``start``: the
    block's first position minus the first query's. Query rows go four at a
    time, the last few one by one, and K and V rows four at a time where
    causality allows, so each element loaded feeds four multiply-adds.
    ``ahead``: where the K and V pages of a later block of this head start
    in ``pool`` (or -1): hints to fetch them go out a few rows at a time
    between the dot products, so the memory works while this block's
    arithmetic runs; issued all at once, more hints than the core has miss
    buffers stalled the loads behind them."""
    rows, dim = queries.shape
    rows4 = rows - rows % 4  # rows taken four at a time
    # Four K rows at once where every query row sees all of them (the
    # whole block is before the first query's position): each query element
    # loaded feeds four K rows, each K element four query rows.
    whole = 0
    if start + in_block <= 1:
        whole = in_block - in_block % 4
    page = k_rows.shape[0] * dim
    for t in range(0, whole, 4):
        if ahead >= 0:  # (K and V rows t to t + 3 of the later block)
            _prefetch_span(pool, ahead + t * dim, ahead + (t + 4) * dim)
            _prefetch_span(pool, ahead + page + t * dim, ahead + page + (t + 4) * dim)
        ka, kb, kc, kd = k_rows[t], k_rows[t + 1], k_rows[t + 2], k_rows[t + 3]
        for j in range(0, rows4, 4):
            a0, a1, a2, a3 = queries[j], queries[j + 1], queries[j + 2], queries[j + 3]
            d0a = d0b = d0c = d0d = d1a = d1b = d1c = d1d = np.float32(0.0)
            d2a = d2b = d2c = d2d = d3a = d3b = d3c = d3d = np.float32(0.0)
            for i in range(dim):
                xa, xb = _as_float(ka[i]), _as_float(kb[i])
                xc, xd = _as_float(kc[i]), _as_float(kd[i])
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
        # Query qi sits at position qi relative to the first and sees
        # positions up to its own: the first query that sees t.
        seen_from = start + t
        for j in range(0, rows4, 4):
            if j // group >= seen_from:  # so do the three rows after it
                a0, a1, a2, a3 = queries[j], queries[j + 1], queries[j + 2], queries[j + 3]
                d0 = d1 = d2 = d3 = np.float32(0.0)
                for i in range(dim):
                    x = _as_float(krow[i])
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
    if ahead >= 0:  # the rows the loop above did not cover
        _prefetch_span(pool, ahead + whole * dim, ahead + page)
        _prefetch_span(pool, ahead + page + whole * dim, ahead + 2 * page)
    _softmax_step(scores, flat_scores, in_block, m, l_sum, acc, exp_bits)
    whole = in_block - in_block % 4
    for j in range(0, rows4, 4):
        o0, o1, o2, o3 = acc[j], acc[j + 1], acc[j + 2], acc[j + 3]
        p0, p1, p2, p3 = scores[j], scores[j + 1], scores[j + 2], scores[j + 3]
        # Four V rows per pass: each output element is loaded and stored
        # once for four of them.
        for t in range(0, whole, 4):
            va, vb, vc, vd = v_rows[t], v_rows[t + 1], v_rows[t + 2], v_rows[t + 3]
            w0a, w0b, w0c, w0d = p0[t], p0[t + 1], p0[t + 2], p0[t + 3]
            w1a, w1b, w1c, w1d = p1[t], p1[t + 1], p1[t + 2], p1[t + 3]
            w2a, w2b, w2c, w2d = p2[t], p2[t + 1], p2[t + 2], p2[t + 3]
            w3a, w3b, w3c, w3d = p3[t], p3[t + 1], p3[t + 2], p3[t + 3]
            for i in range(dim):
                ya, yb = _as_float(va[i]), _as_float(vb[i])
                yc, yd = _as_float(vc[i]), _as_float(vd[i])
                o0[i] += w0a * ya + w0b * yb + w0c * yc + w0d * yd
                o1[i] += w1a * ya + w1b * yb + w1c * yc + w1d * yd
                o2[i] += w2a * ya + w2b * yb + w2c * yc + w2d * yd
                o3[i] += w3a * ya + w3b * yb + w3c * yc + w3d * yd
        for t in range(whole, in_block):
            w0, w1, w2, w3 = p0[t], p1[t], p2[t], p3[t]
            vrow = v_rows[t]
            for i in range(dim):
                y = _as_float(vrow[i])
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
                o0[i] += w0 * _as_float(vrow[i])


@numba.njit(nogil=True)
def _plan(seq_lens, block_size, threads):
    """Splits of the requests' contexts into work items of about equal
    size, at most BLOCKS_PER_SPLIT blocks each, their number a multiple of
    the thread count where contexts are long (so that every thread gets the
    same number of blocks: numba hands each thread an equal share of the
    items). Returns each request's first item (and the total after the
    last) and the blocks per split."""
    num_reqs = seq_lens.shape[0]
    total = 0
    for r in range(num_reqs):
        total += (seq_lens[r] + block_size - 1) // block_size
    target = threads * max(1, -(-total // (threads * BLOCKS_PER_SPLIT)))
    per_split = max(1, -(-total // target))
    first_item = np.empty(num_reqs + 1, np.int64)
    first_item[0] = 0
    for r in range(num_reqs):
        blocks = (seq_lens[r] + block_size - 1) // block_size
        first_item[r + 1] = first_item[r] + max(1, -(-blocks // per_split))
    return first_item, per_split


@numba.njit(inline="always")
def _merge(r, first_item, query_start, group, m_part, l_part, acc_part, out, lse):
    """Request ``r``'s splits merged by log-sum-exp, every head and query
    row, into ``out`` (normalised) and ``lse`` (natural log; -inf where the
    row saw nothing)."""
    heads, dim = out.shape[1], out.shape[3]
    q0 = query_start[r]
    rows = (query_start[r + 1] - q0) * group
    for h in range(heads):
        for j in range(rows):
            qi, g = j // group, j % group
            dst = out[q0 + qi, h, g]
            top = -np.inf
            for item in range(first_item[r], first_item[r + 1]):
                top = max(top, m_part[item, h, j])
            dst[:] = 0.0
            if top == -np.inf:
                lse[q0 + qi, h, g] = -np.inf
                continue
            total = 0.0
            for item in range(first_item[r], first_item[r + 1]):
                weight = math.exp(m_part[item, h, j] - top)
                total += l_part[item, h, j] * weight
                src = acc_part[item, h, j]
                for i in range(dim):
                    dst[i] += src[i] * weight
            for i in range(dim):
                dst[i] /= total
            lse[q0 + qi, h, g] = top + math.log(total)


@numba.njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def _attention(q, flat, block_stride, head_stride, block_size, code, scales, block_table,
               seq_lens, query_start, scale, split_keep, threads, out, lse):
    """Attention of every request's query rows ``q`` ``[tokens, heads,
    group, dim]`` into ``out`` (same shape, float32) and their log-sum-exps
    into ``lse`` ``[tokens, heads, group]``. ``flat`` holds the pages
    ``[blocks, heads, 2, block_size, dim]`` from the first one on, a block
    and a head ``block_stride`` and ``head_stride`` elements apart (the
    heads may be a slice of the pool's); fp8 pages are read as value times
    ``scales[head]`` (K, V). With ``split_keep`` > 0 the first
    head is a split head: its first ``split_cut`` blocks are left out. Each
    work item (a split of a request's blocks) reads its blocks one after
    the other, every head of a block in turn: the heads of a block lie next
    to each other in the pool, so the reads stream through memory rather
    than hopping between 8 KiB pages. bf16 and float32 pages are read in
    place; fp16 and fp8 K and V pages are widened to float32 first. The
    thread that finishes a request's last item merges its items' partial
    states (running max, sum, unnormalised output)."""
    num_reqs = seq_lens.shape[0]
    tokens, heads, group, dim = q.shape
    page = block_size * dim
    first_item, per_split = _plan(seq_lens, block_size, threads)
    items = first_item[num_reqs]
    max_q = 0
    remaining = np.empty(num_reqs, np.int64)  # items of each request not yet done
    for r in range(num_reqs):
        max_q = max(max_q, query_start[r + 1] - query_start[r])
        remaining[r] = first_item[r + 1] - first_item[r]
    m_part = np.empty((items, heads, max_q * group), np.float32)
    l_part = np.empty((items, heads, max_q * group), np.float32)
    acc_part = np.empty((items, heads, max_q * group, dim), np.float32)
    # The pool as rows of ``dim`` elements: a block's K and V rows are
    # slices of it (a reshape per block calls into numba's C helper, which
    # cost about a quarter of a bf16 block's arithmetic).
    pool_rows = flat.reshape((flat.shape[0] // dim, dim))
    # numba hands each thread a contiguous run of the loop's indices; run
    # ``j`` of ``per_thread`` takes items j, j + threads, j + 2 * threads...,
    # so every thread reads from every part of the contexts (where a split
    # head's pages are read only in the later blocks, contiguous runs would
    # leave the last threads more pages than the others).
    per_thread = -(-items // threads)
    for index in numba.prange(per_thread * threads):
        item = (index % per_thread) * threads + index // per_thread
        if item >= items:
            continue
        r = np.searchsorted(first_item, item, side="right") - 1
        length = seq_lens[r]
        q0 = query_start[r]
        nq = query_start[r + 1] - q0
        rows = nq * group
        num_blocks = (length + block_size - 1) // block_size
        b_first = (item - first_item[r]) * per_split
        b_end = min(num_blocks, b_first + per_split)
        cut = split_cut(length, nq, block_size, split_keep)  # the split head's first block
        queries = np.empty((heads, rows, dim), np.float32)
        for h in range(heads):
            for qi in range(nq):
                for g in range(group):
                    for i in range(dim):
                        queries[h, qi * group + g, i] = q[q0 + qi, h, g, i] * scale
        k_bits = np.zeros(page, np.uint32)
        v_bits = np.zeros(page, np.uint32)
        k_rows = k_bits.view(np.float32).reshape((block_size, dim))
        v_rows = v_bits.view(np.float32).reshape((block_size, dim))
        flat_scores = np.empty(rows * block_size, np.float32)  # (no reshape per block)
        scores = flat_scores.reshape((rows, block_size))
        exp_bits = np.empty(rows * block_size, np.int32)
        m = m_part[item]
        l_sum = l_part[item]
        acc = acc_part[item]
        m[:] = -np.inf
        l_sum[:] = 0.0
        acc[:] = 0.0
        for b in range(b_first, b_end):
            block = block_table[r, b] * block_stride
            in_block = min(block_size, length - b * block_size)
            n = in_block * dim
            start = b * block_size - (length - nq)
            for h in range(1 if b < cut else 0, heads):
                base = block + h * head_stride
                # The same head two blocks ahead is fetched while this one
                # is computed (the next block of context is a random page
                # of the pool, which the hardware prefetcher cannot guess).
                ahead = -1
                if b + 2 < b_end and (h > 0 or b + 2 >= cut):
                    ahead = block_table[r, b + 2] * block_stride + h * head_stride
                if code <= 1:  # (compiled for fp8's bytes too, never run for them)
                    row = base // dim
                    _block(pool_rows[row:row + block_size],
                           pool_rows[row + block_size:row + 2 * block_size], in_block, start,
                           group, queries[h], scores, flat_scores, exp_bits, m[h], l_sum[h],
                           acc[h], flat, ahead)
                else:
                    _to_float(flat[base:base + n], code, scales[h, 0], k_bits,
                              k_bits.view(np.float32))
                    _to_float(flat[base + page:base + page + n], code, scales[h, 1], v_bits,
                              v_bits.view(np.float32))
                    _block(k_rows, v_rows, in_block, start, group, queries[h], scores,
                           flat_scores, exp_bits, m[h], l_sum[h], acc[h], flat, ahead)
        if fetch_add(remaining, r, np.int64(-1)) == 1:
            _merge(r, first_item, query_start, group, m_part, l_part, acc_part, out, lse)


@numba.njit(inline="always")
def _queries_to_float(raw, code, values):
    """The first ``values.shape[0]`` query elements of ``raw`` (float32,
    bf16 or fp16 words, or fp8 bytes by ``code``) as float32."""
    n = values.shape[0]
    if code == 0:
        for i in range(n):
            values[i] = raw[i]
    elif code == 1:
        for i in range(n):
            values[i] = _as_float(raw[i])
    else:
        _to_float(raw[:n], code, np.float32(1.0), values.view(np.uint32), values)


@numba.njit(nogil=True, cache=True)
def run_attention(q_raw, q_code, tokens, heads, group, dim, flat, block_stride, head_stride,
                  block_size, code, scales, block_table, seq_lens, query_start, scale, threads,
                  split_keep, out, lse):
    """One call of the kernel: the queries ``q_raw`` (``tokens`` x
    ``heads`` x ``group`` x ``dim`` elements in the format ``q_code``)
    attended over the pages ``flat`` (``_attention`` has the rest) into
    ``out`` and ``lse``, planned for ``threads`` threads (numba's count for
    the calling thread, set from Python: numba's setter compiled into a
    function keeps it out of the cache). Called from Python
    (decode_attention) and from CPU co-attention's serving loop, without
    the GIL."""
    q = np.empty((tokens, heads, group, dim), np.float32)
    _queries_to_float(q_raw, q_code, q.reshape(tokens * heads * group * dim))
    _attention(q, flat, block_stride, head_stride, block_size, code, scales, block_table,
               seq_lens, query_start, scale, split_keep, threads, out, lse)


def raw_words(tensor: torch.Tensor) -> tuple[np.ndarray, int]:
    """A CPU tensor of one of the kernel's formats as the flat numpy array
    the kernel reads (16-bit words for bf16 and fp16, bytes for fp8) and its
    format code."""
    code = _CODES.get(tensor.dtype)
    if code is None:
        raise TypeError("CPU co-attention reads fp32, bf16, fp16, fp8 e4m3fn and e5m2 values, "
                        f"not {tensor.dtype}")
    flat = tensor.reshape(-1)
    if code in (1, 2):
        flat = flat.view(torch.int16)
    elif code > 2:
        flat = flat.view(torch.uint8)
    return flat.numpy(), code


def page_format(pages_dtype: torch.dtype, fp8: torch.dtype | None) -> int:
    """The kernel's code of a page format: fp8 caches hold ``uint8``
    bytes in the format ``fp8``."""
    if fp8 is not None and pages_dtype != torch.uint8:
        raise TypeError(f"fp8 pages are uint8 bytes, not {pages_dtype}")
    code = _CODES.get(fp8 if fp8 is not None else pages_dtype)
    if code is None:
        raise TypeError("CPU co-attention reads fp32, bf16, fp16, fp8 e4m3fn and e5m2 pages, "
                        f"not {fp8 or pages_dtype}")
    return code


def flat_pages(pages: torch.Tensor) -> tuple[np.ndarray, int, int]:
    """The pages as one flat array from their first element (raw 16-bit
    words for bf16 and fp16), and the strides of a block and of a head in
    it. Each K and V page must be contiguous; the heads may be a slice."""
    blocks, heads, _, block_size, dim = pages.shape
    if pages.stride()[2:] != (block_size * dim, dim, 1):
        raise ValueError(f"K and V pages must be contiguous, got strides {pages.stride()}")
    block_stride, head_stride = pages.stride()[:2]
    if block_stride % dim or head_stride % dim:  # (the kernel reads the pool as rows)
        raise ValueError(f"block and head strides must be whole rows, got {pages.stride()}")
    span = (blocks - 1) * block_stride + (heads - 1) * head_stride + 2 * block_size * dim
    flat = pages.as_strided((span,), (1,))
    if pages.dtype not in (torch.float32, torch.uint8):
        flat = flat.view(torch.int16)
    return flat.numpy(), block_stride, head_stride


def head_scales(heads: int, k_scale, v_scale) -> np.ndarray:
    """``[heads, 2]`` K and V scales of fp8 pages: one per tensor (a float)
    or one per head (a sequence)."""
    scales = np.empty((heads, 2), np.float32)
    scales[:, 0] = k_scale
    scales[:, 1] = v_scale
    return scales


def use_threads(threads: int | None, pages_read: int | None = None) -> int:
    """Sets numba's thread count for the calling thread, and returns it: at
    most ``threads`` (None: numba's all), and where ``pages_read`` is given
    no more than one per MIN_PAGES_PER_THREAD pages."""
    most = numba.config.NUMBA_NUM_THREADS
    threads = max(1, min(threads or most, most))
    if pages_read is not None:
        threads = max(1, min(threads, pages_read // MIN_PAGES_PER_THREAD))
    numba.set_num_threads(threads)
    return threads


def decode_attention(
    query: torch.Tensor,
    pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    threads: int | None = None,
    split_keep: int = 0,
    split_out: torch.Tensor | None = None,
    split_lse: torch.Tensor | None = None,
    fp8: torch.dtype | None = None,
    k_scale=1.0,
    v_scale=1.0,
) -> None:
    """Exact attention of short queries over one layer's host pages.

    ``query`` ``[tokens, H_off * G, D]`` (the query heads of the pages' KV
    heads, in order), ``pages`` ``[blocks, H_off, 2, N, D]`` in host memory,
    ``block_table`` ``[requests, max_blocks]``, ``seq_lens`` ``[requests]``
    (context including this step's tokens), ``query_start_loc``
    ``[requests + 1]``; writes ``out`` ``[tokens, H_off * G, D]``. All on the
    CPU. ``threads``: at most this many (None: numba's all), fewer where
    the context is short.

    With ``split_keep`` > 0 the first head is a split head: the GPU attends
    the first ``split_cut(.., split_keep)`` blocks of each request, the
    kernel the rest, into ``split_out`` ``[tokens, G, D]`` and their
    log-sum-exps ``split_lse`` ``[G, tokens]`` (float32, the layout of
    flash attention's); ``out`` then holds the other heads,
    ``[tokens, (H_off - 1) * G, D]``.

    Pages of an fp8 cache are ``uint8`` bytes in the format ``fp8``, read
    as value times ``k_scale`` (K) or ``v_scale`` (V): a float, or one per
    head.
    """
    code = page_format(pages.dtype, fp8)
    heads, block_size, dim = pages.shape[1], pages.shape[3], pages.shape[4]
    tokens = query.shape[0]
    group = query.shape[1] // heads
    q_raw, q_code = raw_words(query.contiguous())
    result = np.empty((tokens, heads, group, dim), np.float32)
    sums = np.empty((tokens, heads, group), np.float32)
    flat, block_stride, head_stride = flat_pages(pages)
    lengths = seq_lens.to(torch.int64).numpy()
    pages_read = heads * int(((lengths + block_size - 1) // block_size).sum())
    run_attention(q_raw, q_code, tokens, heads, group, dim, flat, block_stride, head_stride,
                  block_size, code, head_scales(heads, k_scale, v_scale),
                  block_table.to(torch.int64).numpy(), lengths,
                  query_start_loc.to(torch.int64).numpy(), np.float32(scale),
                  use_threads(threads, pages_read), split_keep, result, sums)
    result = torch.from_numpy(result)
    if split_keep:
        split_out.copy_(result[:, 0])
        split_lse.copy_(torch.from_numpy(sums[:, 0]).T)
        result = result[:, 1:]
    out.copy_(result.reshape(out.shape))
