"""Auto's CPU co-attention split retuned from the engine's own calls (CUDA).

The startup probe (probe.py) measures the two readers of host
memory apart from the engine. Inside engines the kernel can read slower
(run 18: 41-43 GB/s where the probe had measured 52-59, and auto's split gave
the CPU too many heads). The serving loop counts, per layer call, the
kernel's bytes and cycles, the GPU's bytes, which reader finished last and
how long the GPU took past the kernel (service.py).

Windows of RETUNE_WINDOW_S of kernel time each judge the split in force by
what its calls took per offloaded byte. After a window, the rates its calls
show (split.engine_rates) are tried: the metadata builders
resize their layers' shares at their next co-attending step. The next window
keeps them only if their calls took less per byte, by MIN_GAIN; else the
rates before come back and tuning ends. The rates alone do not decide: each
reader slows down the other in the host's memory, so a split balanced on
rates read while the readers overlapped for part of a call is not the
fastest one (run 19: from the probe's 4.125 heads to 3.625, 0.100 s a step
to 0.109). Tuning also ends after RETUNES tries: every new size restarts the
serving loop behind a device sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from vllm_headinfer.coattention.split import RankSplit, engine_rates

# Kernel time per window: at 512K tokens and 4 CPU heads a layer call runs
# the kernel for ~25 ms, so a window holds about 20 calls.
RETUNE_WINDOW_S = 0.5
RETUNES = 4
# A tried split stays if its calls took this much less per byte: steps of
# run 19 varied by a few percent at the same split; a window of ~20 calls
# averages most of that out.
MIN_GAIN = 0.02


class SplitTuning:
    """The process's retuned rates (runtime.CoattentionRuntime holds them).
    ``service`` gives the serving loop's service (None before the first
    co-attending call)."""

    def __init__(self, service: Callable[[], object]) -> None:
        self._service_of = service
        self.reset()

    def reset(self) -> None:
        """Starts over from the startup rates (an engine's builders are
        made: another engine of this process may have tuned before)."""
        self._service = None
        self._since = None  # the service's counters at the window's start
        self._rates: RankSplit | None = None  # None: the startup rates
        # The rates before the split on trial, and their window's cost.
        self._trial: tuple[RankSplit | None, float] | None = None
        self._tries = 0
        self.done = False
        self.version = 0  # changes of the rates in force
        self.change = ""  # the last one, for the log

    def current(self, split: RankSplit) -> tuple[int, RankSplit]:
        """``split`` with the rates in force (the startup ones until a
        window has ended), and their version; ends a window whose kernel
        time is up."""
        service = self._service_of()
        if service is not None and not self.done:
            if service is not self._service:  # (a new loop: its counters start anew)
                self._service, self._since = service, service.control.copy()
            else:
                now = service.control.copy()
                figures = service.figures(self._since, now)
                if figures.kernel_s >= RETUNE_WINDOW_S:
                    self._since = now
                    self._window_ended(split, figures)
        if self._rates is None:
            return self.version, split
        return self.version, replace(split, cpu_rate=self._rates.cpu_rate,
                                     gpu_rate=self._rates.gpu_rate)

    def _window_ended(self, split: RankSplit, figures) -> None:
        cost = figures.seconds_per_byte()
        if self._trial is not None:
            before, before_cost = self._trial
            if cost > before_cost * (1 - MIN_GAIN):  # not faster: back, and stay
                self._rates, self._trial, self.done = before, None, True
                self.version += 1
                self.change = "back to the split before: the one tried was not faster"
                return
        if self._tries == RETUNES:
            self.done = True
            return
        self._trial = (self._rates, cost)
        self._rates = engine_rates(self._rates or split, figures)
        self._tries += 1
        self.version += 1
        self.change = "tried: the rates the engine's calls read"

