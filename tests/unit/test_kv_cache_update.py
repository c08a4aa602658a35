"""HeadInferImpl.do_kv_cache_update on the torch path: a step's new K/V land in
the device pages (resident heads) and the host pages (offloaded heads), slot
by slot, and nothing else changes. Expectations are written out per slot and
head from the layouts (layout.py), independent of ops/torch_attention.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_headinfer import impl as impl_module
from vllm_headinfer.config import HeadInferConfig
from vllm_headinfer.impl import HeadInferImpl
from vllm_headinfer.layout import host_page_shape

E4M3 = torch.float8_e4m3fn
KV_HEADS, GROUP, D, BLOCK, BLOCKS, RESIDENT = 3, 2, 4, 4, 6, 1
NAME = "model.layers.0.self_attn.attn"


class OneLayerPool:
    """The pages of one layer, as HostKVPool.layer gives them."""

    def __init__(self, pages: torch.Tensor) -> None:
        self.pages = pages

    def layer(self, layer_name: str) -> torch.Tensor:
        assert layer_name == NAME
        return self.pages


def stored(x: torch.Tensor, head: int, scales) -> torch.Tensor:
    """What a slot holds for K or V ``x`` of KV head ``head``: the value, or
    its e4m3 byte under that head's scale."""
    if scales is None:
        return x
    return (x / scales[head]).clamp(-448, 448).to(E4M3).view(torch.uint8)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_each_slot_of_resident_and_offloaded_heads_is_written_and_padding_skipped(
    kv_cache_dtype, monkeypatch
):
    """Only engines saw a wrong write before: every head's K/V at its slot, slot -1 untouched."""
    # The torch path on any host (on CUDA the impl would take the CUDA path).
    monkeypatch.setattr(impl_module.current_platform, "is_cuda", lambda: False)
    g = torch.Generator().manual_seed(0)
    fp8 = kv_cache_dtype == "fp8"
    k_scales, v_scales = [0.5, 0.25, 2.0], [1.0, 0.125, 4.0]  # per KV head: a wrong head shows
    layer = SimpleNamespace(layer_name=NAME, _k_scale=torch.tensor(k_scales),
                            _v_scale=torch.tensor(v_scales))
    impl = HeadInferImpl(KV_HEADS * GROUP, D, D**-0.5, num_kv_heads=KV_HEADS,
                         kv_cache_dtype=kv_cache_dtype)
    offloaded = KV_HEADS - RESIDENT

    def garbage(*shape):
        if fp8:
            return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        return torch.randn(*shape, generator=g)

    pages = garbage(*host_page_shape(BLOCKS, offloaded, BLOCK, D))
    impl.place(HeadInferConfig.parse({}), offloaded, OneLayerPool(pages))
    kv_cache = garbage(BLOCKS, RESIDENT, BLOCK, 2 * D)  # vLLM's page: K then V per token
    device_before, host_before = kv_cache.clone(), pages.clone()
    slots = torch.tensor([6, -1, 13, 23, 4, -1])
    key = torch.randn(len(slots) + 2, KV_HEADS, D, generator=g)  # rows past the slots: padding
    value = torch.randn(len(slots) + 2, KV_HEADS, D, generator=g)

    impl.do_kv_cache_update(layer, key, value, kv_cache, slots)

    scales = (k_scales, v_scales) if fp8 else (None, None)
    device, host = device_before.clone(), host_before.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, BLOCK)
        for h in range(KV_HEADS):
            k, v = stored(key[t, h], h, scales[0]), stored(value[t, h], h, scales[1])
            if h < RESIDENT:
                device[block, h, offset] = torch.cat([k, v])
            else:
                host[block, h - RESIDENT, 0, offset] = k
                host[block, h - RESIDENT, 1, offset] = v
    torch.testing.assert_close(kv_cache, device, rtol=0, atol=0)
    torch.testing.assert_close(pages, host, rtol=0, atol=0)
