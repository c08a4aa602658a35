"""The CPU co-attention kernel against a float64 reference over random pages.

Cases cover GQA ratios 1, 4, 6, 7 and 8, head sizes 64 and 128, blocks of 16 and
32 tokens, partial last blocks, many requests, contexts of 0 and 1 tokens,
contexts long enough to split, query lengths of 1 (decode) and several
(speculative verify, causal), and bf16, fp16, fp32 and fp8 pages (the
reference reads fp8 pages as value times scale); every fp16, fp8 e5m2 and
e4m3fn value widens exactly (subnormals, infinities and NaNs too). A split
head: the kernel's part and the torch path's first blocks (the GPU's part on
CUDA) merge to the whole head's attention. Then a layer's CPU share as the
data path calls the kernel, against the CPU path's torch attention.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from vllm_headinfer.coattention.kernel import BLOCKS_PER_SPLIT, decode_attention
from vllm_headinfer.kv_quant import dequantize, quantize


def reference(query, pages, table, seq_lens, starts, scale):
    """Plain attention in float64, one query token at a time."""
    heads, dim = pages.shape[1], pages.shape[4]
    group = query.shape[1] // heads
    block = pages.shape[3]
    out = torch.zeros(query.shape, dtype=torch.float64)
    p64 = pages.to(torch.float64)
    for r, length in enumerate(seq_lens.tolist()):
        q0, q1 = int(starts[r]), int(starts[r + 1])
        if length == 0:
            continue
        ids = table[r, : math.ceil(length / block)]
        k = p64[ids, :, 0].permute(1, 0, 2, 3).reshape(heads, -1, dim)[:, :length]
        v = p64[ids, :, 1].permute(1, 0, 2, 3).reshape(heads, -1, dim)[:, :length]
        for i, t in enumerate(range(q0, q1)):
            visible = length - (q1 - q0) + i + 1
            for h in range(heads):
                qh = query[t, h * group : (h + 1) * group].to(torch.float64)
                w = torch.softmax(qh @ k[h, :visible].T * scale, dim=-1)
                out[t, h * group : (h + 1) * group] = w @ v[h, :visible]
    return out


def run_case(dtype, group, dim, block, seq_lens, query_lens, heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(n / block) for n in seq_lens) + 3
    pages = torch.randn(num_blocks, heads, 2, block, dim, generator=gen).to(dtype)
    ids = list(range(1, num_blocks))
    random.Random(seed).shuffle(ids)
    width = max([math.ceil(n / block) for n in seq_lens] + [1])
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for r, n in enumerate(seq_lens):
        k = math.ceil(n / block)
        table[r, :k] = torch.tensor(ids[used : used + k])
        used += k
    starts = torch.tensor([0] + list(itertools_accumulate(query_lens)), dtype=torch.int32)
    query = torch.randn(int(starts[-1]), heads * group, dim, generator=gen).to(dtype)
    scale = dim**-0.5
    out = torch.empty(query.shape, dtype=dtype)
    decode_attention(query, pages, table, torch.tensor(seq_lens), starts, scale, out)
    expected = reference(query, pages, table, torch.tensor(seq_lens), starts, scale)
    return out.to(torch.float64), expected


def itertools_accumulate(values):
    total = 0
    for v in values:
        total += v
        yield total


# Rounding of the output to the page dtype bounds the difference.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group,dim,block", [(1, 64, 16), (4, 128, 32), (8, 64, 32), (4, 128, 16),
                                             (7, 64, 16)])
def test_decode_matches_float64(dtype, group, dim, block):
    # Partial last blocks, a single-token context, an empty one, and many
    # requests of mixed lengths.
    seq_lens = [1, 0, block, block + 1, 3 * block - 5, 200, 77, 5]
    out, expected = run_case(dtype, group, dim, block, seq_lens, [1] * len(seq_lens))
    assert torch.allclose(out, expected, atol=TOL[dtype], rtol=TOL[dtype]), (out - expected).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [4, 6])
def test_verify_queries_are_causal(dtype, group):
    # With a group of 6, rows taken four at a time mix query tokens.
    seq_lens = [40, 9, 130]
    out, expected = run_case(dtype, group, 64, 16, seq_lens, [5, 3, 8])
    assert torch.allclose(out, expected, atol=TOL[dtype], rtol=TOL[dtype]), (out - expected).abs().max()


def test_long_context_splits_and_merges():
    block = 16
    length = block * BLOCKS_PER_SPLIT * 3 + 7  # four splits, the last partial
    out, expected = run_case(torch.float32, 4, 64, block, [length, 50], [1, 2])
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), (out - expected).abs().max()


@pytest.mark.parametrize("keep", [1, 8, 15])
def test_a_split_heads_parts_merge_to_the_whole_head(keep):
    """Head 0 of the pages split: the GPU's first ``keep`` sixteenths of
    each request's blocks (by the torch path, as the CPU platform computes
    them) and the kernel's rest, merged by log-sum-exp, against the float64
    reference over the whole head; head 1 whole. Contexts of one block (no
    GPU part), long ones (several kernel splits), and verify queries whose
    positions bound the GPU's part."""
    from vllm_headinfer.coattention.share import merge_split_head, split_prefix_tokens
    from vllm_headinfer.coattention.kernel import split_cut
    from vllm_headinfer.layout import host_kv
    from vllm_headinfer.ops.torch_attention import prefix_attention

    gen = torch.Generator().manual_seed(keep)
    group, dim, block = 4, 64, 16
    seq_lens = [1, 16, 17, 200, block * BLOCKS_PER_SPLIT * 2 + 9, 40, 33]
    query_lens = [1, 1, 1, 3, 1, 5, 17]
    width = max(math.ceil(n / block) for n in seq_lens)
    num_blocks = len(seq_lens) * width + 1
    pages = torch.randn(num_blocks, 2, 2, block, dim, generator=gen)
    table = torch.randperm(num_blocks, generator=gen)[: len(seq_lens) * width].view(len(seq_lens), width)
    starts = torch.tensor([0, *itertools_accumulate(query_lens)])
    tokens = int(starts[-1])
    query = torch.randn(tokens, 2 * group, dim, generator=gen)
    lengths = torch.tensor(seq_lens)
    prefix = split_prefix_tokens(lengths, starts, block, keep)
    cuts = [split_cut(n, q, block, keep) * block for n, q in zip(seq_lens, query_lens)]
    assert prefix.tolist() == cuts
    assert prefix[0] == 0 and prefix[4] > 0  # both kinds of request
    assert all(p <= n - q for p, n, q in zip(cuts, seq_lens, query_lens))
    out = torch.empty(tokens, group, dim)
    cpu_out, cpu_lse = torch.empty(tokens, group, dim), torch.empty(group, tokens)
    decode_attention(query, pages, table, lengths, starts, dim**-0.5, out, split_keep=keep,
                     split_out=cpu_out, split_lse=cpu_lse)
    gpu_out, gpu_lse = torch.empty_like(cpu_out), torch.empty_like(cpu_lse)
    prefix_attention(query[:, :group], *host_kv(pages[:, :1]), table, starts, prefix, dim**-0.5,
                     gpu_out, gpu_lse)
    merged = torch.empty_like(cpu_out)
    merge_split_head(merged, gpu_out, gpu_lse, cpu_out, cpu_lse)
    expected = reference(query, pages, table, lengths, starts, dim**-0.5).float()
    assert torch.allclose(merged, expected[:, :group], atol=1e-5, rtol=1e-5), \
        (merged - expected[:, :group]).abs().max()
    assert torch.allclose(out, expected[:, group:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_pages_read_with_their_scales(fp8):
    gen = torch.Generator().manual_seed(4)
    heads, group, dim, block = 2, 4, 64, 16
    seq_lens, query_lens = [1, 40, 130], [1, 1, 3]
    num_blocks = sum(math.ceil(n / block) for n in seq_lens) + 2
    k_scale, v_scale = 0.5, 0.125
    values = torch.randn(num_blocks, heads, 2, block, dim, generator=gen)
    pages = torch.empty(values.shape, dtype=torch.uint8)
    pages[:, :, 0] = quantize(values[:, :, 0], torch.tensor(k_scale), fp8, 1)
    pages[:, :, 1] = quantize(values[:, :, 1], torch.tensor(v_scale), fp8, 1)
    # Every request reads the same blocks (one more than the longest needs).
    width = math.ceil(max(seq_lens) / block) + 1
    table = torch.arange(1, width + 1, dtype=torch.int32).repeat(len(seq_lens), 1)
    starts = torch.tensor([0, *itertools_accumulate(query_lens)], dtype=torch.int32)
    query = torch.randn(int(starts[-1]), heads * group, dim, generator=gen)
    out = torch.empty_like(query)
    decode_attention(query, pages, table, torch.tensor(seq_lens), starts, dim**-0.5, out,
                     fp8=fp8, k_scale=k_scale, v_scale=v_scale)
    read = torch.stack([dequantize(pages[:, :, 0], torch.tensor(k_scale), fp8, 1, torch.float64),
                        dequantize(pages[:, :, 1], torch.tensor(v_scale), fp8, 1, torch.float64)], 2)
    expected = reference(query, read, table, torch.tensor(seq_lens), starts, dim**-0.5)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-5), (out.double() - expected).abs().max()


@pytest.mark.parametrize("share", [2, 1.5])
@pytest.mark.parametrize("kv_cache_dtype,scales", [
    ("auto", None), ("fp8_e4m3", (0.5, 0.25)), ("fp8_e5m2", ([0.5, 2.0, 1.0, 0.25], [1.0, 0.5, 4.0, 2.0])),
])
def test_a_layers_cpu_share(kv_cache_dtype, scales, share):
    """A layer's CPU share (coattention.share.CpuShare) of its three
    offloaded heads (KV heads 1-3 of 4, query heads 2-7 of 8): 2 heads (KV
    heads 2-3) through the kernel, or 1.5 (KV head 3 whole, the later half
    of KV head 2's blocks, merged with the torch path's first half), against
    the CPU data path's torch attention of the same heads; fp8 pages with
    one scale per tensor or per head (one kernel call per head then)."""
    from types import SimpleNamespace

    from vllm_headinfer.coattention.share import CpuShare, HostStep, merge_split_head, split_prefix_tokens
    from vllm_headinfer.kv_quant import Fp8Scales, fp8_dtype
    from vllm_headinfer.layout import host_kv
    from vllm_headinfer.ops.torch_attention import paged_attention, prefix_attention

    gen = torch.Generator().manual_seed(5)
    heads, group, dim, block, offloaded = 4, 2, 64, 16, 3
    impl = SimpleNamespace(num_kv_heads=heads, group=group, num_offloaded=offloaded,
                           scale=dim**-0.5, kv_cache_dtype=kv_cache_dtype)
    k_scale, v_scale = (torch.tensor(s) for s in scales or (1.0, 1.0))
    layer = SimpleNamespace(_k_scale=k_scale, _v_scale=v_scale)
    seq_lens, query_lens = [40, 3, 100], [1, 3, 2]
    width = math.ceil(max(seq_lens) / block)
    num_blocks = len(seq_lens) * width + 1
    values = torch.randn(num_blocks, offloaded, 2, block, dim, generator=gen)
    fp8 = fp8_dtype(kv_cache_dtype)
    pages = values if fp8 is None else values.to(fp8).view(torch.uint8)
    ids = torch.randperm(num_blocks, generator=gen)
    table = ids[: len(seq_lens) * width].view(len(seq_lens), width)
    starts = torch.tensor([0, *itertools_accumulate(query_lens)])
    tokens = int(starts[-1])
    step = HostStep(table, torch.tensor(seq_lens), starts, tokens)
    query = torch.randn(tokens, heads * group, dim, generator=gen)
    cpu = CpuShare(impl, share, threads=1)
    assert (cpu.kv_heads, cpu.query_heads, cpu.whole_query_heads) == (slice(2, 4), slice(4, 8),
                                                                      slice(8 - 2 * int(share), 8))
    out = torch.zeros_like(query)
    split_out, split_lse = torch.empty(tokens, group, dim), torch.empty(group, tokens)
    cpu.attend(layer, query[:, cpu.query_heads], pages, step, out[:, cpu.whole_query_heads],
               split_out=split_out, split_lse=split_lse)
    if cpu.split_keep:
        assert (cpu.split_keep, cpu.gpu_heads, cpu.split_query_heads) == (8, 1, slice(4, 6))
        prefix = split_prefix_tokens(step.seq_lens, starts, block, cpu.split_keep)
        gpu_out, gpu_lse = torch.empty_like(split_out), torch.empty_like(split_lse)
        prefix_attention(query[:, 4:6], *host_kv(pages[:, 1:2]), table, starts, prefix, impl.scale,
                         gpu_out, gpu_lse, Fp8Scales.of(layer, kv_cache_dtype, slice(2, 3)))
        merge_split_head(out[:, 4:6], gpu_out, gpu_lse, split_out, split_lse)
    expected = torch.zeros_like(query)
    paged_attention(query[:, 4:8], *host_kv(pages[:, 1:3]), table, starts, torch.tensor(seq_lens),
                    impl.scale, expected[:, 4:8], Fp8Scales.of(layer, kv_cache_dtype, slice(2, 4)))
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), (out - expected).abs().max()
    assert out[:, :4].abs().max() == 0  # other heads untouched


@pytest.mark.parametrize("fmt", [torch.float16, torch.float8_e5m2, torch.float8_e4m3fn])
def test_every_value_widens_exactly(fmt):
    """Every bit pattern of fp16 and both fp8 formats widens to the float32
    torch gives it (fp8 with a scale applied after)."""
    import numba
    import numpy as np

    from vllm_headinfer.coattention.kernel import _CODES, _to_float

    code, scale = _CODES[fmt], np.float32(0.5 if fmt.itemsize == 1 else 1.0)

    @numba.njit
    def widen(raw, bits):
        _to_float(raw, code, scale, bits, bits.view(np.float32))

    width = 8 * fmt.itemsize
    words = torch.arange(1 << width, dtype=torch.int32).to(torch.int16 if width == 16 else torch.uint8)
    bits = np.zeros(1 << width, np.uint32)
    widen(words.numpy(), bits)
    got, want = torch.from_numpy(bits.view(np.float32)), words.view(fmt).float() * float(scale)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])
