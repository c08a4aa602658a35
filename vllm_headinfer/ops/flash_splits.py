"""The number of KV splits flash attention 3 picks for one FLASH_ATTN call.

Without a split bound (eager steps), FA3 chooses a call's split count from the
call's shape, its KV head count included. That count selects the split kernel
and sizes the split buffers, and FLASH_ATTN's per-request plan
(``scheduler_metadata``) is capped by it. HEADINFER attends a layer's KV heads
in several calls (resident heads, offloaded head groups). Each call gets the
split count of FLASH_ATTN's single call over all heads, and the all-heads
plan for that count. Every head is then split and reduced exactly as in that
one call. Left to choose, a call over fewer heads may pick another count; the
count is not monotonic in the head count, so neither bound is safe for the
other.

FA3 does not return the count, so this module computes it on the host from
the same inputs. It follows the heuristic of the FA3 build vLLM 0.32.0 ships
(``get_num_splits`` in hopper ``flash_api.cpp``, ``heuristics.h``) for 2-byte
K/V, float32 arithmetic included. ``tests/gpu/test_kernels.py`` checks it
against the split buffers that build allocates, over a grid of head counts,
group sizes, head sizes 64 and 128, query lengths and KV lengths;
``tests/test_flash_splits.py`` against the counts it picked on the H100
(``benchmarks/RESULTS.md``, run 8).
"""

from __future__ import annotations

import functools
import math
import struct

_MAX_SPLITS = 128


def _f32(x: float) -> float:
    """``x`` rounded to float32, as FA3 computes its efficiencies."""
    return struct.unpack("f", struct.pack("f", x))[0]


def covers(head_size: int) -> bool:
    """Head sizes whose FA3 tile shapes this module knows and the GPU check
    covers: those FA3 rounds up to 64 or to 128."""
    return head_size <= 64 or 96 < head_size <= 128


def _tile(head_size: int, causal: bool, paged_non_tma: bool, q_rows: int) -> tuple[int, int]:
    """(query rows, KV rows) of one tile of FA3's SM90 forward kernel for
    2-byte elements and equal Q/K and V head sizes, for ``q_rows`` query rows
    per KV head (head size 64 takes one warpgroup for 64 rows or fewer)."""
    if head_size <= 64:
        if q_rows <= 64:
            return 64, 192
        return 192, 128 if causal else 192
    return 128, 128 if causal or paged_non_tma else 176


# Every step computes its count; decode steps repeat one until the longest
# request grows by a KV tile.
@functools.lru_cache(maxsize=1024)
def _heuristic(tiles: int, num_sms: int, kv_tiles: int) -> int:
    """FA3's count for ``tiles`` (query tiles times KV heads) over
    ``kv_tiles`` KV tiles. FA3 also splits a KV head too large for L2 when a
    non-causal call has at least two query tiles per SM; FLASH_ATTN's calls
    are non-causal only for single-token queries, so that never applies."""
    if tiles >= _f32(_f32(0.8) * num_sms) or kv_tiles <= 4:
        return 1
    # The fewest splits whose last wave of tiles fills the SMs within 85% of
    # the best filling.
    efficiency = []
    for splits in range(1, min(_MAX_SPLITS, num_sms, kv_tiles) + 1):
        waves = _f32(float(tiles * splits) / num_sms)
        efficiency.append(_f32(waves / math.ceil(waves)))
    best = max(efficiency)
    return next(s for s, eff in enumerate(efficiency, 1) if eff >= 0.85 * best)


def all_heads_num_splits(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    max_query_len: int,
    max_seq_len: int,
    block_size: int,
    num_sms: int,
) -> int:
    """The split count of FLASH_ATTN's eager FA3 call over ``num_heads``
    query heads: causal, no window, paged K/V of ``block_size`` tokens,
    variable-length queries and keys of at most ``max_query_len`` and
    ``max_seq_len`` tokens, and a head size that ``covers`` accepts. A
    single-token query with a head size outside (64, 128] counts as
    non-causal."""
    assert covers(head_size), head_size
    group = num_heads // num_kv_heads
    causal = not (max_query_len == 1 and not 64 < head_size <= 128)
    rows = max_query_len * group
    tma_q_rows, tma_kv_rows = _tile(head_size, causal, False, rows)
    paged_tma = block_size % tma_kv_rows == 0 and rows > tma_q_rows
    q_rows, kv_rows = _tile(head_size, causal, not paged_tma, rows)
    # A varlen call splits per request within this bound, so FA3 sizes it as
    # if the batch were one long request.
    return _heuristic(num_kv_heads * -(-rows // q_rows), num_sms, -(-max_seq_len // kv_rows))
