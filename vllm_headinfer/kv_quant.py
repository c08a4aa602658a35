"""FP8 KV cache: which KV dtypes HEADINFER stores, and the per-tensor (or
per-head) scales that quantise new K/V and dequantise reads.

With ``--kv-cache-dtype fp8`` vLLM stores one byte per element (its spec
dtype is ``uint8``), in the device pages and, here, in the host pool and the
staging buffers alike: capacity, placement and link traffic all halve. New
K/V are divided by the layer's ``_k_scale`` / ``_v_scale`` and rounded to the
fp8 format (saturating, as vLLM's cache kernels do); reads multiply back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# --kv-cache-dtype values HEADINFER accepts, per platform: those the
# platform's default backend serves (FLASH_ATTN has no e5m2 cache).
PLAIN_KV_DTYPES = ("auto", "float16", "bfloat16")
FP8_KV_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
CUDA_FP8_KV_DTYPES = ("fp8", "fp8_e4m3")


def accepted_kv_dtypes(is_cuda: bool) -> tuple[str, ...]:
    fp8 = CUDA_FP8_KV_DTYPES if is_cuda else tuple(FP8_KV_DTYPES)
    return PLAIN_KV_DTYPES + fp8


def fp8_dtype(kv_cache_dtype: str) -> torch.dtype | None:
    """The fp8 format of a quantised KV cache; None for a plain one."""
    return FP8_KV_DTYPES.get(kv_cache_dtype)


@dataclass(frozen=True)
class Fp8Scales:
    """The fp8 format of a layer's cache and the K/V scales of some of its
    KV heads: one value each, or one per head."""

    dtype: torch.dtype
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def of(cls, layer, kv_cache_dtype: str, heads: slice) -> Fp8Scales | None:
        dtype = fp8_dtype(kv_cache_dtype)
        if dtype is None:
            return None
        return cls(dtype, _heads_of(layer._k_scale, heads), _heads_of(layer._v_scale, heads))


def _heads_of(scale: torch.Tensor, heads: slice) -> torch.Tensor:
    return scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1)[heads]


def _along(scale: torch.Tensor, head_dim: int, ndim: int) -> torch.Tensor:
    """A scale shaped to broadcast over a tensor whose heads are ``head_dim``."""
    if scale.dim() == 0:
        return scale
    shape = [1] * ndim
    shape[head_dim] = -1
    return scale.view(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, head_dim: int) -> torch.Tensor:
    """``x / scale`` in ``dtype``, saturated to its finite range, as the
    cache's ``uint8`` bytes."""
    limit = torch.finfo(dtype).max
    q = (x.float() / _along(scale, head_dim, x.dim())).clamp(-limit, limit).to(dtype)
    return q.view(torch.uint8)


def dequantize(
    pages: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, head_dim: int, out: torch.dtype
) -> torch.Tensor:
    """The values of fp8 ``pages`` (``uint8`` bytes) times ``scale``."""
    return (pages.view(dtype).float() * _along(scale, head_dim, pages.dim())).to(out)
