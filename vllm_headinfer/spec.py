"""The KV cache spec of a HeadInfer layer.

vLLM sizes device pages from ``num_head_slots``: here that is the resident
head count R of the layer, so its block accounting and allocation see only
resident bytes on the device. ``num_offloaded_kv_heads`` records the H - R
heads whose pages live in the host pool, under the same block ids.

Workers report every layer with all heads resident (``customize_spec``);
the engine core re-splits each layer once it has placed them (capacity.py).
Layers with different R have pages of different sizes in one KV cache group,
which vLLM lays out per layer (``UniformTypeKVCacheSpecs``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vllm.utils.torch_utils import get_dtype_size
from vllm.v1.kv_cache_interface import FullAttentionSpec, replace_as


@dataclass(frozen=True, kw_only=True)
class HeadInferAttentionSpec(FullAttentionSpec):
    num_offloaded_kv_heads: int = 0

    @property
    def num_resident_kv_heads(self) -> int:
        return self.num_kv_heads - self.num_offloaded_kv_heads

    @property
    def token_head_bytes(self) -> int:
        """K and V bytes of one token of one KV head."""
        return (self.head_size + self.head_size_v) * get_dtype_size(self.dtype)

    @property
    def host_page_size_bytes(self) -> int:
        """Bytes of one block of this layer in the host pool."""
        return self.num_offloaded_kv_heads * self.block_size * self.token_head_bytes

    @classmethod
    def merge(cls, specs):
        # FullAttentionSpec.merge rebuilds from its own field list and would
        # drop num_offloaded_kv_heads.
        # A drafter's layers may come as plain full-attention specs.
        offloaded = {getattr(s, "num_offloaded_kv_heads", 0) for s in specs}
        assert len(offloaded) == 1, (
            "All HeadInfer layers of a KV cache group must offload the same "
            f"number of heads, got {sorted(offloaded)}"
        )
        merged = super().merge(specs)
        return replace(merged, num_offloaded_kv_heads=offloaded.pop())


def split_spec(spec: FullAttentionSpec, resident: int) -> HeadInferAttentionSpec:
    """``spec`` with only ``resident`` heads' pages on the device.

    With no resident head the device page still needs a non-zero size (vLLM
    divides by it), so it holds one slot of one element per token: a few
    hundred bytes per block, never read.
    """
    offloaded = spec.num_kv_heads - resident
    if resident == 0:
        return replace_as(
            spec,
            HeadInferAttentionSpec,
            num_head_slots=1,
            state_content_bytes=get_dtype_size(spec.dtype),
            num_offloaded_kv_heads=offloaded,
        )
    return replace_as(
        spec,
        HeadInferAttentionSpec,
        num_head_slots=resident,
        state_content_bytes=None,
        num_offloaded_kv_heads=offloaded,
    )


def placeholder_page_bytes(spec: FullAttentionSpec) -> int:
    """Device bytes per block of a layer with no resident head."""
    return split_spec(spec, 0).page_size_bytes
