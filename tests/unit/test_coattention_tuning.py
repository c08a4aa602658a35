"""Auto's split retuned from the engine's own calls: the rates the serving
loop's figures give (split.engine_rates), the windows that take
them (tuning.SplitTuning, against a stand-in of the serving
loop's counters) and a layer's share resized in place (CpuShare.resize)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vllm_headinfer.coattention.share import CpuShare
from vllm_headinfer.coattention.split import LoopFigures, RankSplit, engine_rates
from vllm_headinfer.coattention.tuning import MIN_GAIN, RETUNE_WINDOW_S, RETUNES, SplitTuning

PROBE = RankSplit(threads=15, cpu_rate=59.5e9, gpu_rate=51e9)  # as in run 18 (4.3125 of 8)


def figures(kernel_s=1.0, kernel_gb=42.0, cpu_last=(10, 1.0, 40.0), gpu_last=(0, 0.0, 0.0),
            gpu_wait_s=0.0):
    """Calls, seconds and GPU GB where the CPU (then the GPU) was last; the
    GPU's seconds where it was last count from the kernel's start."""
    return LoopFigures(kernel_s, kernel_gb * 1e9, cpu_last[0], cpu_last[1], cpu_last[2] * 1e9,
                       gpu_last[0], gpu_last[1] - gpu_wait_s, gpu_last[2] * 1e9, gpu_wait_s)


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


def test_a_tie_in_calls_times_the_gpu_in_those_it_was_last():
    """Last in as many calls as the CPU, the GPU's own timing is a measurement, not only a floor."""
    tuned = engine_rates(PROBE, figures(cpu_last=(6, 0.5, 20.0), gpu_last=(6, 1.0, 45.0)))
    assert tuned.gpu_rate == pytest.approx(45e9)  # not the probe's 51 GB/s kept over a floor


def test_no_kernel_time_changes_nothing():
    assert engine_rates(PROBE, figures(kernel_s=0.0, kernel_gb=0.0)) is PROBE


def test_a_split_is_judged_by_its_calls_time_per_offloaded_byte():
    # 1.0 s of kernel and 0.2 s of waiting for the GPU over 42 + 40 + 45 GB.
    f = figures(cpu_last=(4, 0.3, 40.0), gpu_last=(12, 1.0, 45.0), gpu_wait_s=0.2)
    assert f.seconds_per_byte() == pytest.approx(1.2 / 127e9)


class FakeService:
    """The serving loop's counters as SplitTuning reads them: kernel
    seconds, kernel GB and GPU GB, the CPU last in every call."""

    def __init__(self):
        self.control = np.zeros(3, np.float64)

    def run(self, seconds, cpu_gb, gpu_gb=None):
        # By default the GPU's bytes over the kernel's time (a floor, as the
        # CPU was last) stay under the probe's GPU rate.
        self.control += (seconds, cpu_gb, 20.0 * seconds if gpu_gb is None else gpu_gb)

    def figures(self, since, now):
        s, cpu_gb, gpu_gb = now - since
        return figures(kernel_s=s, kernel_gb=cpu_gb, cpu_last=(10, s, gpu_gb))


def tuning_with_service():
    services = [None]
    tuning = SplitTuning(service=lambda: services[0])
    assert tuning.current(PROBE) == (0, PROBE)  # no serving loop yet
    services[0] = service = FakeService()
    assert tuning.current(PROBE) == (0, PROBE)  # the first window starts
    return tuning, service


def test_the_rates_a_window_read_are_tried_and_kept_where_faster():
    tuning, service = tuning_with_service()
    w = RETUNE_WINDOW_S
    service.run(w / 2, 21.0)
    assert tuning.current(PROBE) == (0, PROBE)  # not yet a window's kernel time
    service.run(w / 2, 21.0)  # 42 GB: the CPU read 42 / w GB/s
    version, split = tuning.current(PROBE)
    assert version == 1 and split.cpu_rate == pytest.approx(42e9 / w)
    assert split.gpu_rate == PROBE.gpu_rate and split.threads == PROBE.threads
    # Another group's split (its own thread count) gets the same rates.
    other = RankSplit(threads=7, cpu_rate=1.0, gpu_rate=1.0)
    assert tuning.current(other) == (1, RankSplit(threads=7, cpu_rate=42e9 / w,
                                                  gpu_rate=PROBE.gpu_rate))
    # The tried split's calls took 43% less per byte (0.5 s for 91 GB
    # against 52): kept, and the rates of that window (each window its own
    # figures) tried next.
    service.run(w, 42.0 / 0.9, 40.0 / 0.9)
    version, split = tuning.current(PROBE)
    assert version == 2 and split.cpu_rate == pytest.approx(42e9 / 0.9 / w)
    # The next one's calls were no faster: the one before comes back, for good.
    service.run(w, 42.0 / 0.9, 40.0 / 0.9)
    version, split = tuning.current(PROBE)
    assert version == 3 and split.cpu_rate == pytest.approx(42e9 / w)
    assert tuning.done and "back" in tuning.change
    service.run(10 * w, 1.0)
    assert tuning.current(PROBE) == (3, split)


def test_a_first_try_no_faster_gives_the_startup_split_back():
    tuning, service = tuning_with_service()
    service.run(RETUNE_WINDOW_S, 42.0)
    assert tuning.current(PROBE)[0] == 1
    gain = 1 + MIN_GAIN / 2  # 1% more bytes in the same time: within the noise
    service.run(RETUNE_WINDOW_S, 42.0 * gain, 20.0 * RETUNE_WINDOW_S * gain)
    assert tuning.current(PROBE) == (2, PROBE) and tuning.done


def test_tries_end_after_a_few():
    tuning, service = tuning_with_service()
    gb = 42.0
    for _ in range(RETUNES + 3):
        service.run(RETUNE_WINDOW_S, gb, gb)
        tuning.current(PROBE)
        gb *= 1.1  # every try faster
    assert tuning.done and tuning.version == RETUNES
    assert tuning.current(PROBE)[0] == RETUNES


def test_a_new_serving_loop_or_engine():
    tuning, service = tuning_with_service()
    service.run(RETUNE_WINDOW_S, 42.0)
    assert tuning.current(PROBE)[0] == 1
    # A new serving loop (a new query format): its counters start a window
    # of their own, not the difference from the old loop's.
    new = FakeService()
    new.control += (100.0, 1.0, 1.0)
    tuning._service_of = lambda: new
    assert tuning.current(PROBE)[0] == 1
    new.run(RETUNE_WINDOW_S, 42.0 * 1.1, 10.0 * 1.1)  # 10% faster than the first
    assert tuning.current(PROBE)[0] == 2 and not tuning.done
    # A new engine's builders start over from the startup rates.
    tuning.reset()
    assert tuning.current(PROBE) == (0, PROBE)


def test_the_process_tuning_reads_the_cuda_serving_loop():
    from vllm_headinfer.coattention.runtime import CoattentionRuntime

    runtime = CoattentionRuntime()
    assert runtime.service is None and runtime.tuning._service_of() is None
    service = object()
    runtime.cuda = SimpleNamespace(service=service)
    assert runtime.tuning._service_of() is service


@pytest.mark.parametrize("before,after", [(4.3125, 3.625), (2, 1.5), (1.5, 3), (0.0625, 4)])
def test_a_resized_share_is_a_new_share_of_that_size(before, after):
    impl = SimpleNamespace(num_kv_heads=8, group=4, num_offloaded=6, scale=0.1,
                           kv_cache_dtype="auto")
    share = CpuShare(impl, before, threads=3)
    key = share.key
    share.kernel_arguments(None, lambda layer: 1.0)
    share.resize(after)
    fresh = CpuShare(impl, after, threads=3)
    for name in ("split_keep", "heads", "gpu_heads", "pool_start", "kv_heads",
                 "query_heads", "split_query_heads", "whole_query_heads", "threads"):
        assert getattr(share, name) == getattr(fresh, name), name
    assert share.key != key and share.key[0] == id(share)  # the serving loop's new entry
    assert share._arguments is None  # (per-head scales follow the heads)
    # The same size again: nothing for the serving loop to restart for.
    key = share.key
    share.resize(after)
    assert share.key is key
