"""HEADINFER attention backend: what vLLM asks of a backend, answered."""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType, MultipleOf
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from vllm_headinfer import BACKEND_NAME
from vllm_headinfer.kv_quant import FP8_KV_DTYPES, PLAIN_KV_DTYPES
from vllm_headinfer.spec import HeadInferAttentionSpec, split_spec
from vllm_headinfer.vllm_support import refusal


class HeadInferBackend(AttentionBackend):
    # float32 serves the CPU reference path (and exactness tests).
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    # fp8_e5m2 only on CPU: startup.py refuses it on CUDA, as FLASH_ATTN does.
    supported_kv_cache_dtypes: ClassVar[list] = [*PLAIN_KV_DTYPES, *FP8_KV_DTYPES]
    # K/V are written by do_kv_cache_update (vLLM's separate custom op), to
    # both halves with the same slot mapping, before forward reads them.
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        from vllm_headinfer.impl import HeadInferImpl

        return HeadInferImpl

    @staticmethod
    def get_builder_cls():
        from vllm_headinfer.metadata import HeadInferMetadataBuilder

        return HeadInferMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # Flash attention's paged kernels need multiples of 16; equal kernel
        # and scheduler blocks keep host and device block ids identical.
        return [MultipleOf(16)]

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        # On a vLLM the plugin does not support, this is where vLLM's own
        # backend selection meets the refusal (see registration.py).
        reason = refusal()
        if reason is not None:
            return [reason]
        return super().validate_configuration(*args, **kwargs)

    @classmethod
    def supports_kv_connector(cls) -> bool:
        # A connector would only move the resident half of each block.
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Marks the layer as HEADINFER's with every head resident; the engine
        core places its heads once it knows the device budget (capacity.py)."""
        if isinstance(spec, HeadInferAttentionSpec) or type(spec) is not FullAttentionSpec:
            return spec
        if spec.sliding_window is not None or spec.attention_chunk_size is not None:
            return spec
        return split_spec(spec, spec.num_kv_heads)
