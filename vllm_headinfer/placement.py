"""Placement policy: how many KV heads of each layer stay on the device.

Pure arithmetic, no vLLM and no torch, shared by the engine (which decides
once, in the engine core, where the device KV budget is known after
profiling) and the planner (``python -m vllm_headinfer.plan``).

A *head-layer* is one KV head of one layer on one rank. Per KV block of
``block_size`` tokens it takes ``head_block_bytes`` (K and V) either on the
device (resident) or in the host pool (offloaded). A layer with no resident
head still has a placeholder device page (vLLM needs a non-empty page).
Every decode step reads each offloaded head-layer's KV over the link, so the
policy keeps as many head-layers resident as the device budget allows for the
pool it must hold, and spreads the offloaded ones evenly over the layers
(earlier layers keep the extra resident head): every layer then offloads
almost the same share, and the per-layer transfers stay balanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1 << 30


class PlacementError(ValueError):
    """The pool asked for does not fit the device and host budgets."""


@dataclass(frozen=True)
class RankKV:
    """The KV shape of one rank's HEADINFER layers, in layer order."""

    layer_indices: tuple[int, ...]  # model layer index of each layer
    num_kv_heads: int  # H: KV heads per layer on this rank
    block_size: int  # tokens per block
    head_block_bytes: int  # one head's K+V of one block
    placeholder_bytes: int  # device page of a layer with no resident head
    other_device_bytes: int = 0  # per block, layers HEADINFER does not serve
    # With layers of other attention kinds in the model, vLLM cannot lay out
    # pages of different sizes per layer (several KV cache groups), and it
    # equalises the groups' pages by enlarging blocks, which this arithmetic
    # does not model: explicit counts must be one for all layers, and auto
    # keeps every head resident.
    uniform_only: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.layer_indices)

    @property
    def head_layers(self) -> int:
        return self.num_layers * self.num_kv_heads

    def device_bytes_per_block(self, counts: tuple[int, ...]) -> int:
        return self.other_device_bytes + sum(
            c * self.head_block_bytes if c else self.placeholder_bytes for c in counts
        )

    def host_bytes_per_block(self, counts: tuple[int, ...]) -> int:
        return sum(self.num_kv_heads - c for c in counts) * self.head_block_bytes


@dataclass(frozen=True)
class Budgets:
    device_bytes: int  # device memory for the KV cache
    host_bytes: int  # cpu_kv_gib of this rank
    # Device memory the offload path itself needs (staging buffers), taken
    # from the KV budget only when some head is offloaded.
    offload_device_bytes: int = 0


@dataclass(frozen=True)
class Placement:
    kv: RankKV
    counts: tuple[int, ...]  # resident heads per layer, in kv.layer_indices order
    num_blocks: int  # blocks both budgets hold (block 0 is vLLM's null block)
    limited_by: str  # "device" or "host (cpu_kv_gib)"

    @property
    def resident_head_layers(self) -> int:
        return sum(self.counts)

    @property
    def offloads(self) -> bool:
        return self.resident_head_layers < self.kv.head_layers

    @property
    def device_bytes_per_block(self) -> int:
        return self.kv.device_bytes_per_block(self.counts)

    @property
    def host_bytes_per_block(self) -> int:
        return self.kv.host_bytes_per_block(self.counts)

    @property
    def tokens(self) -> int:
        return max(0, self.num_blocks - 1) * self.kv.block_size

    def resident_of(self, layer_index: int) -> int:
        return self.counts[self.kv.layer_indices.index(layer_index)]

    def link_bytes_per_token(self) -> float:
        """Offloaded KV a decode step reads over the link per token of context."""
        return self.host_bytes_per_block / self.kv.block_size

    def describe_counts(self) -> str:
        """Resident heads per layer in runs, e.g. ``7 in layers 0-11, 6 in 12-31``."""
        return describe_runs(self.kv.layer_indices, self.counts)

    def summary(self, reads: str = "over the link") -> str:
        """The startup line (after ``HEADINFER placement: ``); ``reads`` says
        where decode steps read offloaded heads from (on CPU there is no link)."""
        kv = self.kv
        return (
            f"{self.resident_head_layers}/{kv.head_layers} KV head-layers resident "
            f"per rank ({kv.num_kv_heads} KV heads x {kv.num_layers} layers: "
            f"{self.describe_counts()}); device KV "
            f"{self.num_blocks * self.device_bytes_per_block / GIB:.3f} GiB, host KV "
            f"{self.num_blocks * self.host_bytes_per_block / GIB:.3f} GiB; pool "
            f"{self.num_blocks} blocks = {self.tokens} tokens (limited by "
            f"{self.limited_by}); decode reads "
            f"{self.link_bytes_per_token() * 1024 / (1 << 20):.3f} MiB {reads} "
            "per 1K tokens of context"
        )


def layer_runs(layer_indices, counts) -> list[tuple]:
    """Consecutive layers of equal count: [(count, first index, last index)]."""
    runs: list[list] = []
    for index, count in zip(layer_indices, counts):
        if runs and runs[-1][0] == count and runs[-1][2] + 1 == index:
            runs[-1][2] = index
        else:
            runs.append([count, index, index])
    return [tuple(r) for r in runs]


def describe_runs(layer_indices, counts) -> str:
    """Counts per layer in runs, e.g. ``7 in layers 0-11, 6 in 12-31``."""
    parts = []
    for i, (count, first, last) in enumerate(layer_runs(layer_indices, counts)):
        where = str(first) if first == last else f"{first}-{last}"
        noun = ("layer " if first == last else "layers ") if i == 0 else ""
        parts.append(f"{count} in {noun}{where}")
    return ", ".join(parts)


def size(nbytes: int) -> str:
    """Bytes for people: GiB, or MiB below a tenth of one."""
    if nbytes >= GIB // 10:
        return f"{nbytes / GIB:.2f} GiB"
    return f"{nbytes / (1 << 20):.2f} MiB"


def spread(resident_head_layers: int, num_layers: int, num_kv_heads: int) -> tuple[int, ...]:
    """``resident_head_layers`` spread evenly, earlier layers taking the rest."""
    assert 0 <= resident_head_layers <= num_layers * num_kv_heads
    base, extra = divmod(resident_head_layers, num_layers)
    return tuple(base + (1 if i < extra else 0) for i in range(num_layers))


def candidate_counts(kv: RankKV) -> list[tuple[int, ...]]:
    """Placements auto chooses from, fewest resident head-layers first."""
    if kv.uniform_only:
        return [(kv.num_kv_heads,) * kv.num_layers]
    return [spread(n, kv.num_layers, kv.num_kv_heads) for n in range(kv.head_layers + 1)]


def blocks_held(kv: RankKV, counts: tuple[int, ...], budgets: Budgets) -> tuple[int, str]:
    """Blocks that both budgets hold with these counts, and which one binds."""
    device = budgets.device_bytes
    host_bpb = kv.host_bytes_per_block(counts)
    if host_bpb:
        device -= budgets.offload_device_bytes
    by_device = max(0, device) // kv.device_bytes_per_block(counts)
    if not host_bpb:
        return by_device, "device"
    by_host = budgets.host_bytes // host_bpb
    if by_host < by_device:
        return by_host, "host (cpu_kv_gib)"
    return by_device, "device"


def pool_blocks(pool_tokens: int, block_size: int) -> int:
    """Blocks a pool of ``pool_tokens`` needs, with vLLM's null block."""
    return math.ceil(pool_tokens / block_size) + 1


def fixed(kv: RankKV, counts: tuple[int, ...], budgets: Budgets) -> Placement:
    """The placement of explicit per-layer counts."""
    blocks, limit = blocks_held(kv, counts, budgets)
    return Placement(kv, counts, blocks, limit)


def auto(kv: RankKV, budgets: Budgets, pool_tokens: int | None) -> Placement:
    """The placement with the most resident head-layers whose pool holds
    ``pool_tokens`` (None: the largest pool both budgets hold together).

    Raises PlacementError when no placement holds ``pool_tokens``.
    """
    candidates = candidate_counts(kv)
    if pool_tokens is None:
        # Most blocks; among equals, most resident (the later candidate).
        best = max(
            range(len(candidates)), key=lambda n: (blocks_held(kv, candidates[n], budgets)[0], n)
        )
        return fixed(kv, candidates[best], budgets)
    need = pool_blocks(pool_tokens, kv.block_size)
    for counts in reversed(candidates):
        placement = fixed(kv, counts, budgets)
        if placement.num_blocks >= need:
            return placement
    most = auto(kv, budgets, None)
    raise PlacementError(
        f"a pool of {pool_tokens} tokens needs {need} blocks, but the device KV "
        f"budget ({size(budgets.device_bytes)}) and cpu_kv_gib "
        f"({size(budgets.host_bytes)}) hold at most {most.tokens} tokens "
        f"together ({most.resident_head_layers}/{kv.head_layers} head-layers resident)"
    )


def max_blocks(kvs: list[RankKV], budgets: list[Budgets]) -> int:
    """The largest pool (in blocks) every rank holds: ranks share block ids."""
    return min(auto(kv, b, None).num_blocks for kv, b in zip(kvs, budgets))
