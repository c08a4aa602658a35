"""What the CUDA path takes from vLLM's FLASH_ATTN metadata builder, checked
on this vLLM without a GPU so that a vLLM change fails here, loudly, rather
than on a GPU host: HEADINFER's builder runs FLASH_ATTN's builder for the
full-head spec to get its KV-split plan (``scheduler_metadata``) and split
bound, after pinning its ``aot_sliding_window`` to full attention; it
recomputes the split count of FLASH_ATTN's own call from the query and key
lengths FLASH_ATTN passes (``vllm_headinfer.ops.flash_splits``), and plans for
that count with the builder's ``_get_scheduler_metadata``."""

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


def test_flash_attn_call_and_plan_take_the_lengths_and_bound_of_the_metadata():
    """HEADINFER's eager split count assumes FLASH_ATTN's FA3 call and its
    plan take the batch's longest query and key and the builder's split bound
    (0 when eager), and that the builder plans through
    ``_get_scheduler_metadata`` with the keywords HEADINFER passes."""
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )

    forward = inspect.getsource(FlashAttentionImpl.forward)
    for line in (
        "max_seqlen_q = attn_metadata.max_query_len",
        "max_seqlen_k = attn_metadata.max_seq_len",
        "scheduler_metadata = attn_metadata.scheduler_metadata",
        "num_splits = attn_metadata.max_num_splits",
        "num_splits=num_splits,",
    ):
        assert line in forward, line
    plan = inspect.getsource(FlashAttentionMetadataBuilder._get_scheduler_metadata)
    for line in ("max_seqlen_q=max_query_len,", "max_seqlen_k=max_seq_len,",
                 "num_splits=max_num_splits,"):
        assert line in plan, line
    keywords = list(inspect.signature(FlashAttentionMetadataBuilder._get_scheduler_metadata).parameters)
    assert keywords == ["self", "aot_schedule", "batch_size", "cu_query_lens", "max_query_len",
                        "seqlens", "max_seq_len", "causal", "max_num_splits"], keywords
