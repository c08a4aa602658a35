"""Auto's CPU co-attention split retuned from the engine's own calls (CUDA).

The startup probe (coattention_probe) measures the two readers of host
memory apart from the engine. Inside engines the kernel read slower (run 18:
41-43 GB/s where the probe had measured 52-59), so auto gave the CPU too many
heads and every layer waited for the kernel. The serving loop counts, per
layer call, the kernel's bytes and cycles, the GPU's bytes, and which reader
finished last (coattention_service). Once its calls have run the kernel for
RETUNE_WINDOW_S, the rates they show (coattention_split.engine_rates)
replace the ones in use, and each metadata builder resizes its layers'
shares at its next co-attending step. After RETUNES windows the split
stays: every new size restarts the serving loop behind a device sync, and
two neighbouring sixteenths could otherwise take turns for ever.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from vllm_headinfer.coattention_split import RankSplit, engine_rates

# Kernel time per window: at 512K tokens and 4 CPU heads a layer call runs
# the kernel for ~25 ms, so a window holds about 20 calls.
RETUNE_WINDOW_S = 0.5
RETUNES = 4


def _cuda_service():
    from vllm_headinfer import coattention_path

    cuda = coattention_path._cuda
    return cuda.service if cuda is not None else None


class SplitTuning:
    """The process's retuned rates. ``service`` gives the serving loop's
    service (None before the first co-attending call)."""

    def __init__(self, service: Callable[[], object] = _cuda_service) -> None:
        self._service_of = service
        self._service = None
        self._since = None  # the service's counters at the window's start
        self._rates: RankSplit | None = None
        self.version = 0  # windows that have set the rates

    def current(self, split: RankSplit) -> tuple[int, RankSplit]:
        """``split`` with the latest rates (the startup ones until a window
        has ended), and their version; ends a window whose kernel time is
        up."""
        service = self._service_of()
        if service is not None and self.version < RETUNES:
            if service is not self._service:  # (a new loop: its counters start anew)
                self._service, self._since = service, service.control.copy()
            else:
                figures = service.figures(self._since)
                if figures.kernel_s >= RETUNE_WINDOW_S:
                    self._rates = engine_rates(self._rates or split, figures)
                    self._since = service.control.copy()
                    self.version += 1
        if self._rates is None:
            return 0, split
        return self.version, replace(split, cpu_rate=self._rates.cpu_rate,
                                     gpu_rate=self._rates.gpu_rate)


split_tuning = SplitTuning()
