"""What the CUDA path takes from vLLM's FLASH_ATTN metadata builder, checked
on this vLLM without a GPU so that a vLLM change fails here, loudly, rather
than on a GPU host: HEADINFER's builder runs FLASH_ATTN's builder for the
full-head spec to get its KV-split plan (``scheduler_metadata``) and split
bound, after pinning its ``aot_sliding_window`` to full attention."""

from __future__ import annotations

import dataclasses
import inspect


def test_builder_signature_and_plan_fields():
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionMetadata,
        FlashAttentionMetadataBuilder,
    )

    init = list(inspect.signature(FlashAttentionMetadataBuilder.__init__).parameters)
    assert init == ["self", "kv_cache_spec", "layer_names", "vllm_config", "device"], init
    build = list(inspect.signature(FlashAttentionMetadataBuilder.build).parameters)
    assert build == ["self", "common_prefix_len", "common_attn_metadata", "fast_build"], build
    fields = {f.name for f in dataclasses.fields(FlashAttentionMetadata)}
    assert {"scheduler_metadata", "max_num_splits"} <= fields, fields


def test_sliding_window_is_read_from_the_attribute_headinfer_pins():
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    build = inspect.getsource(FlashAttentionMetadataBuilder.build)
    init = inspect.getsource(FlashAttentionMetadataBuilder.__init__)
    assert "self.aot_sliding_window" in init
    assert "if self.aot_sliding_window is None:" in build
    assert "window_size=_maybe_symmetrize_window(self.aot_sliding_window" in inspect.getsource(
        FlashAttentionMetadataBuilder._get_scheduler_metadata
    )
