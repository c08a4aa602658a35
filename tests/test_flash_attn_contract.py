"""What the CUDA path takes from vLLM's FLASH_ATTN metadata builder, checked
on this vLLM without a GPU so that a vLLM change fails here, loudly, rather
than on a GPU host: HEADINFER's builder runs FLASH_ATTN's builder for the
full-head spec to get its KV-split plan (``scheduler_metadata``) and split
bound, after pinning its ``aot_sliding_window`` to full attention; and it
recomputes the split count of FLASH_ATTN's own call, which FA3 derives from
the block table FLASH_ATTN passes (``vllm_headinfer.flash_splits``)."""

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


def test_flash_attn_call_takes_the_plan_bound_and_block_table_of_its_metadata():
    """HEADINFER's eager split count assumes FLASH_ATTN's FA3 call passes the
    builder's split bound (0 when eager) and its full-width block table."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    forward = inspect.getsource(FlashAttentionImpl.forward)
    for line in (
        "block_table = attn_metadata.block_table",
        "scheduler_metadata = attn_metadata.scheduler_metadata",
        "num_splits = attn_metadata.max_num_splits",
        "num_splits=num_splits,",
        "block_table=block_table,",
    ):
        assert line in forward, line
