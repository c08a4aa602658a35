"""torch_attention.py against a naive per-token reference.

Caches are ``[blocks, heads, block_size, D + Dv]`` (K then V); every request
owns random, non-contiguous blocks; unused cache slots and block-table entries
hold random finite values, so a wrong mask or a wrong block shows up.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from vllm_headinfer.layout import device_kv, host_kv
from vllm_headinfer.ops.torch_attention import paged_attention, write_paged


def naive_attention(q, ks, vs, q_lens, seq_lens, scale):
    """Per query token, per head: softmax over the keys at positions <= its own."""
    out = torch.zeros(q.shape[0], q.shape[1], vs[0].shape[-1], dtype=torch.float64)
    hq, hk = q.shape[1], ks[0].shape[1]
    group = hq // hk
    row = 0
    for r, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        for i in range(q_len):
            pos = seq_len - q_len + i
            for h in range(hq):
                k = ks[r][: pos + 1, h // group].double()
                v = vs[r][: pos + 1, h // group].double()
                s = (k @ q[row, h].double()) * scale
                out[row, h] = torch.softmax(s, 0) @ v
            row += 1
    return out


def make_batch(seed, q_lens, seq_lens, hq, hk, d, dv, block_size, dtype, num_blocks=None):
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = num_blocks or sum(need) + 5
    # Garbage everywhere first: slots a request does not own must not matter.
    cache = torch.randn(num_blocks, hk, block_size, d + dv, generator=g).to(dtype) * 3
    perm = torch.randperm(num_blocks - 1, generator=g) + 1  # keep block 0 as vLLM's null block
    width = max(need) + 2
    table = torch.randint(0, num_blocks, (len(seq_lens), width), generator=g, dtype=torch.int32)
    ks, vs, taken = [], [], 0
    for r, seq_len in enumerate(seq_lens):
        blocks = perm[taken : taken + need[r]]
        taken += need[r]
        table[r, : need[r]] = blocks.to(torch.int32)
        k = torch.randn(seq_len, hk, d, generator=g).to(dtype)
        v = torch.randn(seq_len, hk, dv, generator=g).to(dtype)
        for t in range(seq_len):
            b, o = blocks[t // block_size], t % block_size
            cache[b, :, o, :d] = k[t]
            cache[b, :, o, d:] = v[t]
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, cache, table, qsl, torch.tensor(seq_lens, dtype=torch.int32), ks, vs


CASES = {
    # name: (q_lens, seq_lens, hq, hk, d, dv, block_size)
    "prefill-mha": ([37], [37], 4, 4, 32, 32, 16),
    "prefill-gqa-exact-blocks": ([64], [64], 8, 2, 32, 32, 32),
    "chunk-with-context-gqa": ([20, 33], [85, 33 + 64], 8, 2, 16, 16, 16),
    "decode-batch-gqa": ([1, 1, 1, 1], [1, 17, 64, 130], 6, 2, 32, 32, 32),
    "decode-batch-mha": ([1, 1, 1], [200, 5, 33], 4, 4, 16, 16, 32),
    "mixed-decodes-and-chunks": ([1, 12, 1, 40, 1], [90, 12, 3, 101, 32], 4, 2, 32, 32, 16),
    "single-token-prompt": ([1], [1], 4, 1, 8, 8, 16),
    "head-size-v-differs": ([9, 1], [30, 44], 4, 2, 32, 16, 16),
    "group-of-four": ([5, 1, 16], [5, 61, 48], 8, 2, 8, 8, 16),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_paged_attention_matches_naive(name, dtype, tol):
    q_lens, seq_lens, hq, hk, d, dv, bs = CASES[name]
    q, cache, table, qsl, sl, ks, vs = make_batch(
        zlib.crc32(name.encode()), q_lens, seq_lens, hq, hk, d, dv, bs, dtype
    )
    scale = d**-0.5
    out = torch.full((q.shape[0], hq, dv), float("nan"), dtype=dtype)
    paged_attention(q, *device_kv(cache, d), table, qsl, sl, scale, out)
    ref = naive_attention(q, ks, vs, q_lens, seq_lens, scale)
    assert not out.isnan().any(), "rows left unwritten"
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_head_split_into_two_caches_writes_its_slices():
    """The backend's use: resident heads from one cache, offloaded heads from
    another, each writing its own query-head slice of one output tensor."""
    q_lens, seq_lens, hq, hk, d, bs = [7, 1, 1], [50, 19, 64], 8, 4, 16, 16
    resident = 1
    group = hq // hk
    q, cache, table, qsl, sl, ks, vs = make_batch(5, q_lens, seq_lens, hq, hk, d, d, bs, torch.float32)
    dev = cache[:, :resident].clone()
    # The host half in the pool's layout: [blocks, heads, 2, N, D].
    host = torch.stack(device_kv(cache[:, resident:], d), dim=2).clone()
    out = torch.full((q.shape[0] + 3, hq, d), float("nan"))  # padded like vLLM's output
    n = q.shape[0]
    rq = resident * group
    paged_attention(q[:n, :rq], *device_kv(dev, d), table, qsl, sl, d**-0.5, out[:n, :rq])
    paged_attention(q[:n, rq:], *host_kv(host), table, qsl, sl, d**-0.5, out[:n, rq:])
    ref = naive_attention(q, ks, vs, q_lens, seq_lens, d**-0.5)
    torch.testing.assert_close(out[:n].double(), ref, atol=2e-5, rtol=2e-5)
    assert out[n:].isnan().all(), "wrote past num_actual_tokens"


def test_write_paged_stores_each_token_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    blocks, heads, bs, d = 6, 3, 16, 8
    cache = torch.randn(blocks, heads, bs, 2 * d, generator=g)
    before = cache.clone()
    slots = torch.tensor([17, -1, 3, 95, 40, -1, 0])
    key = torch.randn(len(slots) + 2, heads, d, generator=g)  # padded rows
    value = torch.randn(len(slots) + 2, heads, d, generator=g)
    write_paged(*device_kv(cache, d), key, value, slots)
    expect = before.clone()
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        expect[s // bs, :, s % bs, :d] = key[t]
        expect[s // bs, :, s % bs, d:] = value[t]
    torch.testing.assert_close(cache, expect, atol=0, rtol=0)


def test_write_paged_converts_dtype():
    cache = torch.zeros(2, 1, 16, 8, dtype=torch.bfloat16)
    key = torch.full((1, 1, 4), 1.5, dtype=torch.float32)
    value = torch.full((1, 1, 4), -2.25, dtype=torch.float32)
    write_paged(*device_kv(cache, 4), key, value, torch.tensor([21]))
    assert cache[1, 0, 5, :4].eq(1.5).all() and cache[1, 0, 5, 4:].eq(-2.25).all()
    assert cache.count_nonzero() == 8


def test_written_cache_reads_back_through_attention():
    """write_paged then paged_attention equals attention over the raw K/V."""
    g = torch.Generator().manual_seed(11)
    hq, hk, d, bs, seq = 4, 2, 16, 16, 45
    table = torch.tensor([[3, 1, 5, 0]], dtype=torch.int32)
    slots = torch.tensor([table[0, t // bs].item() * bs + t % bs for t in range(seq)])
    k, v = torch.randn(seq, hk, d, generator=g), torch.randn(seq, hk, d, generator=g)
    pages = torch.randn(6, hk, 2, bs, d, generator=g)  # host layout
    write_paged(*host_kv(pages), k, v, slots)
    q = torch.randn(seq, hq, d, generator=g)
    out = torch.empty(seq, hq, d)
    paged_attention(q, *host_kv(pages), table, torch.tensor([0, seq]), torch.tensor([seq]), 0.3, out)
    ref = naive_attention(q, [k], [v], [seq], [seq], 0.3)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
