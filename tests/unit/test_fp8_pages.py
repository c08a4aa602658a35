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
    layer = _Layer([1.0, 4.0, 0.25], [2.0, 1.0, 8.0])
    part = Fp8Scales.of(layer, "fp8", slice(1, 3))
    assert part.k.tolist() == [4.0, 0.25] and part.v.tolist() == [1.0, 8.0]
    assert Fp8Scales.of(layer, "auto", slice(0, 3)) is None
    x = torch.randn(5, 2, 8)  # [tokens, heads, D]
    q = quantize(x, part.k, E4M3, 1)
    expected = torch.stack([_reference_roundtrip(x[:, h], part.k[h], E4M3) for h in range(2)], 1)
    torch.testing.assert_close(dequantize(q, part.k, E4M3, 1, torch.float64), expected)


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

    def roundtrip(x, scale):
        return torch.stack([_reference_roundtrip(x[:, h], scale.reshape(-1)[h % scale.numel()], E4M3)
                            for h in range(hk)], 1)

    ref = naive_attention(q, [roundtrip(k, fp8.k) for k in ks], [roundtrip(v, fp8.v) for v in vs],
                          q_lens, seq_lens, d**-0.5)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    # Not the float32 result: the cache really holds fp8.
    exact = naive_attention(q, ks, vs, q_lens, seq_lens, d**-0.5)
    assert (out.double() - exact).abs().max() > 1e-3

