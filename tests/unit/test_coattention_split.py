"""CPU co-attention's policy (coattention/split.py) and its settings.

The per-layer split against brute force over every share in sixteenths of a head, the thread
count of a rank, auto's decisions from the cores and the measured rates, the
startup line, and how config.py parses and startup.py checks the two settings.
"""

from __future__ import annotations

import itertools

import pytest

from vllm_headinfer.coattention.split import (
    MIN_CORES_PER_RANK,
    MIN_CPU_SHARE_S,
    RankSplit,
    auto_split,
    SHARE_STEPS,
    balanced_cpu_share,
    kernel_threads,
    rank_cores,
    startup_line,
)
from vllm_headinfer.config import HeadInferConfig, HeadInferConfigError
from vllm_headinfer.startup import check_cpu_attention

RATES = [1e9, 16e9, 30e9, 48e9, 50e9, 60e9, 91.8e9, 200e9]


def slower(c: float, offloaded: int, cpu: float, gpu: float) -> float:
    return max(c / cpu, (offloaded - c) / gpu)


@pytest.mark.parametrize("offloaded", range(0, 9))
def test_each_layer_waits_least_for_its_slower_reader(offloaded):
    shares = [n / SHARE_STEPS for n in range(offloaded * SHARE_STEPS + 1)]
    for cpu, gpu in itertools.product(RATES, RATES):
        c = balanced_cpu_share(offloaded, cpu, gpu)
        assert c in shares
        best = min(slower(n, offloaded, cpu, gpu) for n in shares)
        assert slower(c, offloaded, cpu, gpu) == pytest.approx(best, rel=1e-12), (offloaded, cpu, gpu, c)
        # Of equally good shares, the smallest.
        assert all(slower(n, offloaded, cpu, gpu) > best * (1 + 1e-12) for n in shares if n < c)
        # Within a sixteenth of the share at which both would finish together.
        assert abs(c - offloaded * cpu / (cpu + gpu)) < 1 / SHARE_STEPS


def test_examples():
    assert balanced_cpu_share(8, 48e9, 48e9) == 4  # equal rates: half each
    assert isinstance(balanced_cpu_share(8, 48e9, 48e9), int)  # whole heads stay whole
    assert balanced_cpu_share(8, 96e9, 48e9) == 5.3125  # 5.33: the CPU's 5 5/16 finish first
    assert balanced_cpu_share(8, 44e9, 49.5e9) == 3.75  # run 15's in-engine rates: 3.76
    assert balanced_cpu_share(1, 60e9, 48e9) == 0.5625  # one head: 9/16 to the faster reader
    assert balanced_cpu_share(1, 40e9, 48e9) == 0.4375
    assert balanced_cpu_share(4, 0.0, 48e9) == 0
    assert balanced_cpu_share(0, 60e9, 48e9) == 0


def test_a_gpu_that_reads_nothing_leaves_every_head_to_the_cpu():
    """A GPU rate of 0 (it reads nothing over the link): the CPU attends every offloaded head."""
    assert balanced_cpu_share(4, 60e9, 0) == 4
    assert balanced_cpu_share(1, 60e9, 0.0) == 1
    assert balanced_cpu_share(4, 0.0, 0.0) == 0  # neither reads: nothing to give the CPU


def test_totals_follow_the_rates_share():
    split = RankSplit(cpu_rate=60e9, gpu_rate=48e9)
    shares = split.layer_shares([8] * 16 + [7] * 16 + [1] * 4)
    share = sum(shares) / (8 * 16 + 7 * 16 + 4)
    assert abs(share - 60 / 108) < 1 / SHARE_STEPS / 7


def test_threads_of_a_rank():
    assert rank_cores(16, 1) == 16 and kernel_threads(16) == 15
    assert rank_cores(16, 4) == 4 and kernel_threads(4) == 3
    assert rank_cores(2, 4) == 1 and kernel_threads(1) == 1
    assert rank_cores(2, 0) == 2


def test_auto_is_off_without_cores_and_measures_otherwise():
    def never(threads):
        raise AssertionError("measured with too few cores")

    off = auto_split(MIN_CORES_PER_RANK - 1, None, never)
    assert off.cpu_share(8) == 0 and "3 core(s)" in off.off_reason
    measured = []
    split = auto_split(MIN_CORES_PER_RANK, None, lambda t: measured.append(t) or (60e9, 48e9))
    assert measured == [MIN_CORES_PER_RANK - 1] and split.threads == MIN_CORES_PER_RANK - 1
    assert split.cpu_share(8) == balanced_cpu_share(8, 60e9, 48e9) > 0
    assert auto_split(16, 6, lambda t: measured.append(t) or (60e9, 48e9)).threads == 6
    assert measured[-1] == 6


def test_fixed_shares_are_capped_per_layer():
    assert RankSplit(fixed=3).layer_shares([0, 2, 3, 8]) == [0, 2, 3, 3]
    assert RankSplit(fixed=2.5).layer_shares([1, 2, 3]) == [1, 2, 2.5]
    assert RankSplit(fixed=0).layer_shares([8]) == [0]


def test_auto_coattends_steps_whose_cpu_share_is_long_enough():
    """Auto's steps co-attend from the context at which the CPU's share of a
    layer takes MIN_CPU_SHARE_S; a fixed count co-attends every step."""
    token_head = 2 * 128 * 2  # K and V of one bf16 token of one head
    split = RankSplit(threads=15, cpu_rate=30e9, gpu_rate=48e9)
    tokens = split.min_step_tokens(3, token_head)
    assert (tokens - 1) * 3 * token_head / 30e9 < MIN_CPU_SHARE_S <= tokens * 3 * token_head / 30e9
    assert 15_000 < tokens < 25_000  # 1 ms of a 30 GB/s reader over 3 heads
    assert abs(split.min_step_tokens(6, token_head) - tokens / 2) <= 1  # twice the heads
    assert abs(split.min_step_tokens(1.5, token_head) - tokens * 2) <= 1  # half the heads
    assert split.min_step_tokens(0, token_head) == 0
    assert RankSplit(threads=15, fixed=3).min_step_tokens(3, token_head) == 0


def test_step_context_tokens():
    from types import SimpleNamespace

    import torch

    from vllm_headinfer.metadata import step_context_tokens

    step = SimpleNamespace(seq_lens_cpu_upper_bound=torch.tensor([100, 20, 7, 999]), num_reqs=3,
                           max_seq_len=100)
    assert step_context_tokens(step) == 127  # padding past num_reqs is not counted
    step.seq_lens_cpu_upper_bound = None
    assert step_context_tokens(step) == 300  # the longest, for every request


def test_startup_line():
    assert startup_line(RankSplit(fixed=0), [0, 1], [2, 2]) is None
    assert startup_line(RankSplit(fixed=1), [0, 1], [0, 0]) is None
    assert startup_line(RankSplit(fixed=0, off_reason="why"), [0], [2]) == "off (auto: why)"
    line = startup_line(RankSplit(threads=15, cpu_rate=60e9, gpu_rate=48e9), [0, 1, 2], [4, 4, 1])
    assert line.startswith("CPU threads attend 5.0625/9 offloaded KV head-layers per rank "
                           "(2.25 in layers 0-1, 0.5625 in 2), 15 thread(s); measured CPU "
                           "60.0 GB/s, GPU link 48.0 GB/s"), line
    line = startup_line(RankSplit(threads=15, cpu_rate=48e9, gpu_rate=48e9), [0, 1], [4, 4])
    assert line.startswith("CPU threads attend 4/8 offloaded KV head-layers per rank (2 in layers 0-1)")
    slow = startup_line(RankSplit(cpu_rate=0.1e9, gpu_rate=48e9), [0], [4])
    assert slow.startswith("off (auto: measured CPU 0.1 GB/s") and "too slow" in slow
    assert startup_line(RankSplit(threads=1, fixed=2), [3], [4]).endswith("fixed by cpu_attention")


@pytest.mark.parametrize("raw,attention,threads", [
    ({}, "auto", "auto"),
    ({"cpu_attention": "off"}, "off", "auto"),
    ({"cpu_attention": 0, "cpu_attention_threads": 1}, 0, 1),
    ({"cpu_attention": 3, "cpu_attention_threads": "auto"}, 3, "auto"),
    ({"cpu_attention": 2.0}, 2, "auto"),
    ({"cpu_attention": 0.0625}, 0.0625, "auto"),
    ({"cpu_attention": 3.75}, 3.75, "auto"),
])
def test_settings_parse(raw, attention, threads):
    cfg = HeadInferConfig.parse(raw)
    assert (cfg.cpu_attention, cfg.cpu_attention_threads) == (attention, threads)
    assert type(cfg.cpu_attention) is type(attention)
    assert cfg.fixed_cpu_share == {"auto": None, "off": 0}.get(attention, attention)


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("VLLM_HEADINFER_CPU_ATTENTION", "2")
    monkeypatch.setenv("VLLM_HEADINFER_CPU_ATTENTION_THREADS", "7")
    cfg = HeadInferConfig.parse({})
    assert (cfg.cpu_attention, cfg.cpu_attention_threads) == (2, 7)
    monkeypatch.setenv("VLLM_HEADINFER_CPU_ATTENTION", "1.5")
    assert HeadInferConfig.parse({}).fixed_cpu_share == 1.5
    monkeypatch.setenv("VLLM_HEADINFER_CPU_ATTENTION", "off")
    assert HeadInferConfig.parse({}).fixed_cpu_share == 0


@pytest.mark.parametrize("raw,needles", [
    ({"cpu_attention": -1}, ["cpu_attention", "'auto', 'off' or a number of KV heads >= 0",
                              "a multiple of 1/16"]),
    ({"cpu_attention": "all"}, ["cpu_attention", "'all'"]),
    ({"cpu_attention": 1.3}, ["cpu_attention", "1.3", "sixteenths"]),
    ({"cpu_attention": float("inf")}, ["cpu_attention"]),
    ({"cpu_attention": True}, ["cpu_attention"]),
    ({"cpu_attention_threads": 0}, ["cpu_attention_threads", ">= 1"]),
    ({"cpu_attention_threads": "off"}, ["cpu_attention_threads", "'auto'"]),
])
def test_bad_settings_name_the_setting(raw, needles):
    with pytest.raises(HeadInferConfigError) as err:
        HeadInferConfig.parse(raw)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_fixed_count_needs_in_place_decode_on_cuda():
    staged = HeadInferConfig.parse({"cpu_attention": 2, "decode_path": "staged"})
    with pytest.raises(HeadInferConfigError, match=r"cpu_attention.*decode_path 'uva'"):
        check_cpu_attention(staged, is_cuda=True)
    check_cpu_attention(staged, is_cuda=False)  # decode_path is CUDA's
    for raw in ({"cpu_attention": "auto", "decode_path": "staged"},
                {"cpu_attention": 0, "decode_path": "staged"},
                {"cpu_attention": 2, "decode_path": "uva"}):
        check_cpu_attention(HeadInferConfig.parse(raw), is_cuda=True)
