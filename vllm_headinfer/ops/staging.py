"""Device staging for offloaded KV: a double buffer and a UVA gather kernel.

Prefill chunks re-read each KV block once per query tile, so reading pinned
host memory in place from the attention kernel is ~100x slower than copying
the blocks to the device first. The gather copies the pages of one head group
(contiguous inside a host block, see host_pool.py) of the requested blocks into
a compact device buffer with wide, coalesced loads straight from pinned memory,
which runs at the link's speed even for small blocks, where per-block DMA
copies would not. Two buffers let group g+1 travel while group g computes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_GATHER_TILE = 4096  # elements per program: 8 KiB of bf16


@triton.jit
def _gather_pages_kernel(
    src_ptr,  # host pool of one layer, offset to the group's first head
    dst_ptr,  # staging buffer: [num_ids, chunk]
    ids_ptr,  # [num_ids] int32 block ids
    src_block_stride,  # elements between consecutive host blocks
    chunk,  # elements of one block's head group
    TILE: tl.constexpr,
):
    i = tl.program_id(0)
    part = tl.program_id(1)
    block = tl.load(ids_ptr + i).to(tl.int64)
    offs = part * TILE + tl.arange(0, TILE)
    mask = offs < chunk
    vals = tl.load(src_ptr + block * src_block_stride + offs, mask=mask)
    tl.store(dst_ptr + i.to(tl.int64) * chunk + offs, vals, mask=mask)


def gather_pages(src: torch.Tensor, block_ids: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst[i] = src[block_ids[i]]`` for a ``src`` whose pages are contiguous
    (host pages ``[blocks, heads, ...]`` sliced on heads only)."""
    chunk = src[0].numel()
    assert src[0].is_contiguous()
    num = block_ids.numel()
    if num == 0:
        return
    grid = (num, triton.cdiv(chunk, _GATHER_TILE))
    _gather_pages_kernel[grid](
        src, dst, block_ids, src.stride(0), chunk, TILE=_GATHER_TILE, num_warps=4
    )


class StagingBuffers:
    """Two device buffers shared by all layers of a process (layers run one
    after another). Allocated when the first layer with offloaded heads is
    placed; the engine core took their size from the device KV budget when
    it placed heads off the device (capacity.offload_device_bytes)."""

    def __init__(self, total_bytes: int, device: torch.device) -> None:
        half = (total_bytes // 2) // 256 * 256
        self.bytes_per_buffer = half
        self.buffers = [torch.empty(half, dtype=torch.uint8, device=device) for _ in range(2)]
        self.free = [torch.cuda.Event() for _ in range(2)]
        self.ready = [torch.cuda.Event() for _ in range(2)]
        self.stream = torch.cuda.Stream(device=device)

    def view(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return self.buffers[index].view(dtype)[:n].view(shape)


_shared: StagingBuffers | None = None


def shared_staging(total_bytes: int, device: torch.device) -> StagingBuffers:
    global _shared
    if _shared is None or _shared.bytes_per_buffer < (total_bytes // 2) // 256 * 256:
        _shared = StagingBuffers(total_bytes, device)
    return _shared


# Below this many staged bytes per layer one group is cheaper: the exposed
# copy of a first group (~1 ms at link speed) costs less than extra launches.
SINGLE_GROUP_BYTES = 64 << 20


def plan_head_groups(num_heads: int, bytes_per_head: int, buffer_bytes: int) -> list[tuple[int, int]] | None:
    """Splits ``num_heads`` offloaded heads into groups that fit one buffer.

    Small layers stage in one group. Larger ones use up to four groups where
    heads allow, so only the first group's copy is exposed and each later copy
    overlaps the attention of the previous group. None when one head does not
    fit a buffer.
    """
    fit = buffer_bytes // bytes_per_head if bytes_per_head else num_heads
    if fit == 0:
        return None
    if num_heads * bytes_per_head <= min(SINGLE_GROUP_BYTES, buffer_bytes):
        size = num_heads
    else:
        size = min(fit, -(-num_heads // 4))
    return [(h, min(h + size, num_heads)) for h in range(0, num_heads, size)]
