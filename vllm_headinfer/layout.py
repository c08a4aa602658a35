"""Where K and V sit inside a page, for the device and the host halves.

Device pages are vLLM's: ``[blocks, R, N, D + Dv]``, K and V side by side in
each token's row. Host pages are ``[blocks, H_off, 2, N, D]``: per block and
head a K plane then a V plane, each ``N * D`` contiguous elements. A decode
step over UVA reads the host planes directly; on huge pages and a 32-layer
working set, planes read at 50.9 GB/s against 44.0 GB/s for K and V rows
interleaved token by token (benchmarks/RESULTS.md). Both
halves are head-major inside a block, so the pages of a head group of a block
are one contiguous run (what the staging gather copies).

Both helpers return ``(k, v)`` views shaped ``[blocks, heads, N, D]``;
``fa_view`` shows one of them as flash attention reads it.
"""

from __future__ import annotations

import torch
from vllm.utils.torch_utils import canonicalize_singleton_dim_strides


def device_kv(pages: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pages[..., :head_size], pages[..., head_size:]


def host_kv(pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return pages[:, :, 0], pages[:, :, 1]


def host_page_shape(num_blocks: int, heads: int, block_size: int, head_size: int) -> tuple:
    return (num_blocks, heads, 2, block_size, head_size)


def fa_view(cache: torch.Tensor) -> torch.Tensor:
    """A ``[blocks, heads, N, D]`` K or V view as flash attention's
    ``[blocks, N, heads, D]``."""
    # A single head gives a size-1 dim with a degenerate stride, which the
    # TMA loads of FA3 reject.
    return canonicalize_singleton_dim_strides(cache.transpose(1, 2))
