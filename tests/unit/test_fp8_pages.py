"""FP8 KV pages of HEADINFER's torch path (the engines are in
tests/engine/test_fp8_kv.py).

vLLM's own CPU fp8 attention (x86 with AVX-512 or AMX only) is no reference
for it: its output over a 100-token decode differs from float64 attention
over the same fp8-rounded K/V by up to 0.05, where its float32 path differs
from float64 by 2e-7 (vLLM 0.32.0, ``vec`` kernels). So the fp8 write and read
of the torch path (device pages and host pool use the same code) are checked
against a plain reference: quantise with the scale, dequantise, attend in
float64; per-tensor and per-head scales, saturation.
"""

from __future__ import annotations

import pytest
import torch
from test_torch_attention import make_batch, naive_attention

from vllm_headinfer.kv_quant import Fp8Scales, dequantize, quantize
from vllm_headinfer.layout import device_kv
from vllm_headinfer.ops.torch_attention import paged_attention, write_paged

E4M3 = torch.float8_e4m3fn


class _Layer:
    def __init__(self, k_scale, v_scale):
        self._k_scale, self._v_scale = torch.tensor(k_scale), torch.tensor(v_scale)


def _reference_roundtrip(x: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    return (x.double() / scale.double()).clamp(-limit, limit).to(dtype).double() * scale.double()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_saturates_and_round_trips(dtype):
    x = torch.tensor([[0.0, 1.0, -3.5, 1e6, -1e6, 0.3]])
    scale = torch.tensor(0.5)
    q = quantize(x, scale, dtype, 0)
    assert q.dtype == torch.uint8
    back = dequantize(q, scale, dtype, 0, torch.float64)
    limit = torch.finfo(dtype).max
    assert back[0, 3] == limit * 0.5 and back[0, 4] == -limit * 0.5  # saturated, not inf/nan
    torch.testing.assert_close(back, _reference_roundtrip(x, scale, dtype), rtol=0, atol=0)


def test_per_head_scales_apply_to_their_heads():
    """The same K under heads 1 and 2's scales (4 and 1/4) gives hand-computed e4m3 bytes."""
    layer = _Layer([1.0, 4.0, 0.25], [2.0, 1.0, 8.0])
    part = Fp8Scales.of(layer, "fp8", slice(1, 3))
    assert part.k.tolist() == [4.0, 0.25] and part.v.tolist() == [1.0, 8.0]
    assert Fp8Scales.of(layer, "auto", slice(0, 3)) is None
    x = torch.tensor([[[1.0, -6.0, 3000.0], [1.0, -6.0, 0.3]]])  # [tokens, heads, D]
    q = quantize(x, part.k, E4M3, 1)
    # x / 4: 0.25 = 2^-2, -1.5, 750 saturated to 448 = 1.75 * 2^8; x / (1/4): 4 = 2^2,
    # -24 = -1.5 * 2^4, 1.2 rounded to 1.25 (three mantissa bits); exponent bias 7.
    assert q.tolist() == [[[0x28, 0xBC, 0x7E], [0x48, 0xDC, 0x3A]]]
    back = dequantize(q, part.k, E4M3, 1, torch.float64)
    assert back.tolist() == [[[1.0, -6.0, 1792.0], [1.0, -6.0, 0.3125]]]


@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_pages_written_and_attended_like_the_reference(per_head):
    """Tokens written through write_paged into fp8 pages, then attended by
    paged_attention (decodes and a prefill chunk), against attention in
    float64 over the quantised-then-dequantised K/V."""
    q_lens, seq_lens, hq, hk, d, block = [1, 9, 1], [40, 9, 75], 8, 2, 16, 16
    q, cache, table, qsl, sl, ks, vs = make_batch(3, q_lens, seq_lens, hq, hk, d, d, block, torch.float32)
    scales = ([0.05, 0.2], [0.1, 0.03]) if per_head else (0.07, 0.04)
    fp8 = Fp8Scales.of(_Layer(*scales), "fp8", slice(0, hk))
    pages = torch.zeros(cache.shape, dtype=torch.uint8)
    k_cache, v_cache = device_kv(pages, d)
    for r, seq_len in enumerate(seq_lens):
        slots = torch.tensor([int(table[r, t // block]) * block + t % block for t in range(seq_len)])
        write_paged(k_cache, v_cache, ks[r], vs[r], slots, fp8)
    out = torch.zeros(q.shape[0], hq, d)
    paged_attention(q, k_cache, v_cache, table, qsl, sl, d**-0.5, out, fp8)

    # The reference takes the scales from the test's own numbers, not from fp8.
    k_scales, v_scales = (torch.tensor(x, dtype=torch.float64).expand(hk) for x in scales)

    def roundtrip(x, scale):
        return torch.stack([_reference_roundtrip(x[:, h], scale[h], E4M3) for h in range(hk)], 1)

    # The pages hold the bytes of K / scale and V / scale, head by head.
    for r, seq_len in enumerate(seq_lens):
        for t in range(seq_len):
            page, offset = int(table[r, t // block]), t % block
            for cache, x, scale in ((k_cache, ks[r], k_scales), (v_cache, vs[r], v_scales)):
                expect = (x[t] / scale[:, None].float()).to(E4M3).view(torch.uint8)
                assert cache[page, :, offset].equal(expect), (r, t)
    ref = naive_attention(q, [roundtrip(k, k_scales) for k in ks],
                          [roundtrip(v, v_scales) for v in vs], q_lens, seq_lens, d**-0.5)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    # Not the float32 result: the cache really holds fp8.
    exact = naive_attention(q, ks, vs, q_lens, seq_lens, d**-0.5)
    assert (out.double() - exact).abs().max() > 1e-3

