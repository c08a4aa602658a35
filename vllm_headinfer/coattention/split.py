"""CPU co-attention policy: how many offloaded KV heads of a layer CPU threads
attend, and with how many threads.

Pure arithmetic, no torch and no vLLM. In a decode (or verify) step two
readers take a layer's offloaded heads at once: CPU threads attend ``c`` of
them in host memory while the GPU reads the other ``H_off - c`` over the link.
Every head of a layer holds the same bytes, and the next layer needs this
layer's output, so each layer waits for its slower reader: a step takes the
sum over layers of ``max(c / cpu_rate, (H_off - c) / gpu_rate)`` head-reads.
The ideal share, where both readers finish together, is
``H_off * cpu / (cpu + gpu)`` heads, rarely a whole number: with whole heads
the slower reader of a layer of 8 heads waits up to half a head (6%) for
nothing, and a layer of one or two offloaded heads (what automatic placement
leaves) could hardly be shared at all. So ``c`` counts sixteenths of a head:
the CPU takes ``floor(c)`` heads whole and, of one more head (the split
head), the later ``c - floor(c)`` of each request's blocks, while the GPU
reads its first blocks; the two parts are merged by log-sum-exp. Each
layer's share is the multiple of 1/16 next to the ideal one whose slower
reader finishes first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from vllm_headinfer.placement import describe_runs

# Below this many cores per rank, auto leaves co-attention off: one core
# stays with the rank's Python thread (it launches the GPU's work), and one
# or two kernel threads (5-7 GB/s of host reads each on the H100 host,
# against ~50 GB/s over the link) would not win back what co-attention
# costs: steps without full CUDA graphs and a handshake in every layer.
MIN_CORES_PER_RANK = 4

# Auto leaves a step's offloaded heads to the GPU where the CPU's share of a
# layer would take less than this: each co-attending layer pays a fixed cost
# (the handshake with the serving thread, waking the kernel's threads, the
# query and output copies), which a share this short would not win back.
MIN_CPU_SHARE_S = 1e-3

# A layer's CPU share is a multiple of 1/SHARE_STEPS of a head.
SHARE_STEPS = 16


def balanced_cpu_share(offloaded: int, cpu_rate: float, gpu_rate: float) -> float:
    """The CPU's share (heads, a multiple of 1/SHARE_STEPS) of a layer with
    ``offloaded`` heads in host memory, for the two readers' rates
    (bytes/s): the slower reader finishes first; of two equal choices, the
    smaller share."""
    if offloaded <= 0 or cpu_rate <= 0:
        return 0
    if gpu_rate <= 0:
        return offloaded
    ideal = offloaded * SHARE_STEPS * cpu_rate / (cpu_rate + gpu_rate)
    low = math.floor(ideal)
    slower = lambda c: max(c / cpu_rate, (offloaded * SHARE_STEPS - c) / gpu_rate)  # noqa: E731
    steps = min((low, min(offloaded * SHARE_STEPS, low + 1)), key=slower)
    return steps // SHARE_STEPS if steps % SHARE_STEPS == 0 else steps / SHARE_STEPS


def heads_text(share: float) -> str:
    """A share of heads as people read it: 4, 3.75."""
    return f"{share:g}"


def rank_cores(node_cores: int, ranks_per_node: int) -> int:
    """Cores one rank may use: the ranks of a node share its cores."""
    return max(1, node_cores // max(1, ranks_per_node))


def kernel_threads(cores: int) -> int:
    """Kernel threads of a rank with ``cores`` cores: all but the one its
    Python thread launches the GPU's work from."""
    return max(1, cores - 1)


@dataclass(frozen=True)
class RankSplit:
    """Co-attention of one rank: a fixed share of heads per layer (0: off),
    or the two readers' measured rates (bytes/s) to balance. ``off_reason``
    says why auto turned it off, for the startup line."""

    threads: int = 1
    fixed: float | None = None
    cpu_rate: float = 0.0
    gpu_rate: float = 0.0
    off_reason: str | None = None
    threads_why: str = ""  # why that many threads, for the startup line

    def cpu_share(self, offloaded: int) -> float:
        """The heads (in sixteenths) of a layer's ``offloaded`` heads that
        CPU threads attend."""
        if self.fixed is not None:
            return min(self.fixed, offloaded)
        return balanced_cpu_share(offloaded, self.cpu_rate, self.gpu_rate)

    def layer_shares(self, offloaded: Sequence[int]) -> list[float]:
        return [self.cpu_share(n) for n in offloaded]

    def min_step_tokens(self, cpu_share: float, token_head_bytes: int) -> int:
        """Context tokens (summed over a step's requests) from which a step
        co-attends ``cpu_share`` heads of ``token_head_bytes`` K/V bytes per
        token: every step for a fixed share (what the setting asked for),
        for auto the steps whose CPU share takes at least MIN_CPU_SHARE_S."""
        if self.fixed is not None or cpu_share <= 0:
            return 0
        return math.ceil(MIN_CPU_SHARE_S * self.cpu_rate / (cpu_share * token_head_bytes))


def auto_split(
    cores: int, threads: int | None, measure: Callable[[int], tuple[float, float]]
) -> RankSplit:
    """Auto on CUDA for a rank with ``cores`` cores and ``threads`` kernel
    threads (None: all cores but one): ``measure(threads)`` gives the CPU's
    and the GPU's read rates, both reading at once; it is not called where
    too few cores make co-attention pointless."""
    if cores < MIN_CORES_PER_RANK:
        reason = f"{cores} core(s) for this rank, {MIN_CORES_PER_RANK} needed"
        return RankSplit(fixed=0, off_reason=reason)
    threads = threads or kernel_threads(cores)
    cpu_rate, gpu_rate = measure(threads)
    return RankSplit(threads=threads, cpu_rate=cpu_rate, gpu_rate=gpu_rate)


@dataclass(frozen=True)
class LoopFigures:
    """What the serving loop counted over some co-attending layer calls:
    the kernel's seconds and bytes, and, by which reader finished last, the
    calls, the kernel's seconds in them and the bytes the GPU read in them;
    where the GPU was last, also its seconds past the kernel's end."""

    kernel_s: float
    kernel_bytes: float
    cpu_last_calls: int
    cpu_last_kernel_s: float
    cpu_last_gpu_bytes: float
    gpu_last_calls: int
    gpu_last_kernel_s: float
    gpu_last_gpu_bytes: float
    gpu_wait_s: float  # the GPU's time past the kernel's end, in the calls it was last

    @property
    def gpu_last_s(self) -> float:
        """The GPU's time in the calls it was last: from the kernel's start
        to the GPU's end."""
        return self.gpu_last_kernel_s + self.gpu_wait_s

    def seconds_per_byte(self) -> float:
        """What the calls took (each its slower reader's time) per byte of
        the layers' offloaded K/V: the cost a split is judged by."""
        offloaded = self.kernel_bytes + self.cpu_last_gpu_bytes + self.gpu_last_gpu_bytes
        return (self.kernel_s + self.gpu_wait_s) / offloaded if offloaded > 0 else 0.0


def engine_rates(split: RankSplit, figures: LoopFigures) -> RankSplit:
    """Auto's split with the rates the engine's own calls show: the
    kernel's, as it read; the GPU's, where it finished last in at least half
    the calls, its bytes over its time in those, else no less than the rate it
    already had (it waited for the CPU: its bytes over the kernel's time are
    only a floor). The startup probe reads apart from the engine, and in
    engines of run 18 the kernel read 41-43 GB/s where the probe had
    measured 52-59: the split gave the CPU too many heads."""
    if figures.kernel_s <= 0 or figures.kernel_bytes <= 0:
        return split
    cpu = figures.kernel_bytes / figures.kernel_s
    if (figures.gpu_last_calls >= figures.cpu_last_calls and figures.gpu_last_s > 0
            and figures.gpu_last_gpu_bytes > 0):
        gpu = figures.gpu_last_gpu_bytes / figures.gpu_last_s
    else:
        floor = (figures.cpu_last_gpu_bytes / figures.cpu_last_kernel_s
                 if figures.cpu_last_kernel_s > 0 else 0.0)
        gpu = max(split.gpu_rate, floor)
    return replace(split, cpu_rate=cpu, gpu_rate=gpu)


def startup_line(split: RankSplit, layer_indices: Sequence[int], offloaded: Sequence[int]) -> str | None:
    """What co-attention does for these layers (after ``HEADINFER CPU
    co-attention: ``); None where nothing is offloaded or the setting
    turned it off."""
    if not any(offloaded) or (split.fixed == 0 and split.off_reason is None):
        return None
    if split.off_reason is not None:
        return f"off (auto: {split.off_reason})"
    shares = split.layer_shares(offloaded)
    rates = (
        "fixed by cpu_attention" if split.fixed is not None else
        f"measured CPU {split.cpu_rate / 1e9:.1f} GB/s, GPU link {split.gpu_rate / 1e9:.1f} GB/s "
        "reading host memory at once"
    )
    if not any(shares):
        return (f"off (auto: {rates}: the CPU is too slow to take 1/{SHARE_STEPS} of "
                f"{max(offloaded)} offloaded KV heads)")
    runs = describe_runs(layer_indices, [heads_text(s) for s in shares])
    return (f"CPU threads attend {heads_text(sum(shares))}/{sum(offloaded)} offloaded KV "
            f"head-layers per rank ({runs}), {split.threads} thread(s)"
            + (f" ({split.threads_why})" if split.threads_why else "") + f"; {rates}")
