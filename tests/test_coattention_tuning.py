"""Auto's split retuned from the engine's own calls: the rates the serving
loop's figures give (coattention_split.engine_rates), the windows that take
them (coattention_tuning.SplitTuning, against a stand-in of the serving
loop's counters) and a layer's share resized in place (CpuShare.resize)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vllm_headinfer import coattention_tuning
from vllm_headinfer.coattention_path import CpuShare
from vllm_headinfer.coattention_split import LoopFigures, RankSplit, engine_rates
from vllm_headinfer.coattention_tuning import RETUNE_WINDOW_S, RETUNES, SplitTuning

PROBE = RankSplit(threads=15, cpu_rate=59.5e9, gpu_rate=51e9)  # as in run 18 (4.3125 of 8)


def figures(kernel_s=1.0, kernel_gb=42.0, cpu_last=(10, 1.0, 40.0), gpu_last=(0, 0.0, 0.0)):
    """Calls, seconds and GPU GB where the CPU (then the GPU) was last."""
    return LoopFigures(kernel_s, kernel_gb * 1e9, cpu_last[0], cpu_last[1], cpu_last[2] * 1e9,
                       gpu_last[0], gpu_last[1], gpu_last[2] * 1e9)


def test_the_kernels_rate_is_what_it_read():
    tuned = engine_rates(PROBE, figures())
    assert tuned.cpu_rate == pytest.approx(42e9)
    # The CPU was last: the GPU's 40 GB over the kernel's second is a floor
    # under the rate it had.
    assert tuned.gpu_rate == 51e9
    assert tuned.threads == 15 and tuned.fixed is None
    # Run 18's case: 4.3125 heads from the probe, 3.625 from the engine.
    assert PROBE.cpu_share(8) == 4.3125 and tuned.cpu_share(8) == 3.625


def test_a_gpu_that_waited_is_at_least_as_fast_as_it_was_seen():
    tuned = engine_rates(PROBE, figures(cpu_last=(10, 1.0, 60.0)))
    assert tuned.gpu_rate == pytest.approx(60e9)


def test_a_gpu_last_in_most_calls_is_timed_in_those():
    # 12 calls where the GPU ended last: 45 GB in 1.0 s of kernel + waits.
    tuned = engine_rates(PROBE, figures(cpu_last=(4, 0.3, 12.0), gpu_last=(12, 1.0, 45.0)))
    assert tuned.gpu_rate == pytest.approx(45e9)
    assert tuned.cpu_share(8) == 3.875


def test_no_kernel_time_changes_nothing():
    assert engine_rates(PROBE, figures(kernel_s=0.0, kernel_gb=0.0)) is PROBE


class FakeService:
    """The serving loop's counters as SplitTuning reads them."""

    def __init__(self):
        self.control = np.zeros(2, np.float64)  # (kernel seconds, kernel GB)

    def run(self, seconds, gb):
        self.control += (seconds, gb)

    def figures(self, since):
        s, gb = self.control - since
        return figures(kernel_s=s, kernel_gb=gb, cpu_last=(10, s, 0.0))


def test_windows_of_kernel_time_set_the_rates_a_few_times():
    services = [None]
    tuning = SplitTuning(service=lambda: services[0])
    assert tuning.current(PROBE) == (0, PROBE)  # no serving loop yet
    services[0] = service = FakeService()
    assert tuning.current(PROBE) == (0, PROBE)  # the first window starts
    service.run(RETUNE_WINDOW_S / 2, 21.0)
    assert tuning.current(PROBE) == (0, PROBE)  # not yet a window's kernel time
    service.run(RETUNE_WINDOW_S / 2, 21.0)
    version, split = tuning.current(PROBE)
    assert version == 1 and split.cpu_rate == pytest.approx(42e9 / RETUNE_WINDOW_S)
    assert split.gpu_rate == PROBE.gpu_rate and split.threads == PROBE.threads
    # Each window its own figures, not the sum since the start.
    service.run(RETUNE_WINDOW_S, 25.0)
    assert tuning.current(PROBE)[1].cpu_rate == pytest.approx(25e9 / RETUNE_WINDOW_S)
    # Another group's split (its own thread count) gets the same rates.
    other = RankSplit(threads=7, cpu_rate=1.0, gpu_rate=1.0)
    assert tuning.current(other) == (2, RankSplit(threads=7, cpu_rate=25e9 / RETUNE_WINDOW_S,
                                                  gpu_rate=PROBE.gpu_rate))
    for _ in range(RETUNES + 2):
        service.run(RETUNE_WINDOW_S, 30.0)
        version, split = tuning.current(PROBE)
    assert version == RETUNES  # then the split stays
    # A new serving loop (a new query format) starts its own window.
    services[0] = FakeService()
    assert tuning.current(PROBE)[0] == RETUNES


def test_the_process_tuning_reads_the_cuda_serving_loop(monkeypatch):
    from vllm_headinfer import coattention_path

    monkeypatch.setattr(coattention_path, "_cuda", None)
    assert coattention_tuning._cuda_service() is None
    service = object()
    monkeypatch.setattr(coattention_path, "_cuda", SimpleNamespace(service=service))
    assert coattention_tuning._cuda_service() is service


@pytest.mark.parametrize("before,after", [(4.3125, 3.625), (2, 1.5), (1.5, 3), (0.0625, 4)])
def test_a_resized_share_is_a_new_share_of_that_size(before, after):
    impl = SimpleNamespace(num_kv_heads=8, group=4, num_offloaded=6, scale=0.1,
                           kv_cache_dtype="auto")
    share = CpuShare(impl, before, threads=3)
    key = share.key
    share.kernel_arguments(None, lambda layer: 1.0)
    share.resize(after)
    fresh = CpuShare(impl, after, threads=3)
    for name in ("share", "split_keep", "heads", "gpu_heads", "pool_start", "kv_heads",
                 "query_heads", "split_query_heads", "whole_query_heads", "threads"):
        assert getattr(share, name) == getattr(fresh, name), name
    assert share.key != key and share.key[0] is share  # the serving loop's new entry
    assert share._arguments is None  # (per-head scales follow the heads)
