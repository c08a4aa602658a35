"""The placement policy on its own: pure arithmetic, no engine.

Shapes are those of the Llama-3-8B model (32 layers, 8 KV heads of 128, bf16,
16-token blocks: 128 KiB of KV per token) with the budgets measured on the
H100 host (52.6 GiB of device KV at gpu_memory_utilization 0.9, 90 GiB of
host memory), and small ones where exhaustive checks are cheap.
"""

from __future__ import annotations

import itertools
import random

import pytest

from vllm_headinfer import placement as policy

GIB = 1 << 30
LLAMA8B = policy.RankKV(
    layer_indices=tuple(range(32)),
    num_kv_heads=8,
    block_size=16,
    head_block_bytes=16 * 2 * 128 * 2,
    placeholder_bytes=16 * 2,
)
H100 = policy.Budgets(device_bytes=int(52.6 * GIB), host_bytes=90 * GIB, offload_device_bytes=GIB)


def test_spread_is_even_with_earlier_layers_first():
    assert policy.spread(7, 4, 2) == (2, 2, 2, 1)
    assert policy.spread(0, 3, 4) == (0, 0, 0)
    assert policy.spread(12, 3, 4) == (4, 4, 4)
    for n in range(0, 33):
        counts = policy.spread(n, 8, 4)
        assert sum(counts) == n and max(counts) - min(counts) <= 1
        assert list(counts) == sorted(counts, reverse=True)


def test_counts_in_runs():
    kv = policy.RankKV(tuple(range(32)), 8, 16, 8192, 32)
    p = policy.Placement(kv, (7,) * 12 + (6,) * 20, 10, "device")
    assert p.describe_counts() == "7 in layers 0-11, 6 in 12-31"
    one = policy.RankKV((4,), 2, 16, 8192, 32)
    assert policy.Placement(one, (2,), 10, "device").describe_counts() == "2 in layer 4"


def test_runs_never_join_layers_that_are_not_adjacent():
    """Other attention kinds sit between HEADINFER layers: a run spans adjacent indices only."""
    assert policy.layer_runs((1, 3, 5), (2, 2, 2)) == [(2, 1, 1), (2, 3, 3), (2, 5, 5)]
    assert policy.describe_runs((1, 3, 5), (2, 2, 2)) == "2 in layer 1, 2 in 3, 2 in 5"
    assert policy.describe_runs((1, 2, 4, 5), (2, 2, 2, 2)) == "2 in layers 1-2, 2 in 4-5"


def test_max_pool_reaches_both_budgets_within_two_percent():
    p = policy.auto(LLAMA8B, H100, None)
    per_token = LLAMA8B.head_layers * LLAMA8B.head_block_bytes / LLAMA8B.block_size
    ideal = (H100.device_bytes - H100.offload_device_bytes + H100.host_bytes) / per_token
    assert p.tokens >= 0.98 * ideal
    assert p.tokens >= 1_150_000
    # The device holds about 36% of the pool: most head-layers are offloaded.
    assert 0.3 < p.resident_head_layers / LLAMA8B.head_layers < 0.4


def test_pool_target_keeps_the_most_heads_resident():
    target = 524_288
    p = policy.auto(LLAMA8B, H100, target)
    assert p.num_blocks >= policy.pool_blocks(target, 16)
    more = policy.spread(p.resident_head_layers + 1, 32, 8)
    assert policy.blocks_held(LLAMA8B, more, H100)[0] < policy.pool_blocks(target, 16)
    # 52.6 GiB of 64 GiB stay resident: about 80% of head-layers.
    assert 0.78 < p.resident_head_layers / LLAMA8B.head_layers < 0.82
    assert p.link_bytes_per_token() * target < 13 * GIB


def test_device_alone_holds_the_pool_means_nothing_offloaded():
    p = policy.auto(LLAMA8B, H100, 131_072)
    assert p.counts == (8,) * 32
    assert not p.offloads and p.host_bytes_per_block == 0
    # The staging reservation is not taken when nothing is offloaded.
    assert p.num_blocks == H100.device_bytes // (LLAMA8B.head_layers * LLAMA8B.head_block_bytes)


def test_pool_that_does_not_fit_is_refused():
    with pytest.raises(policy.PlacementError, match="at most"):
        policy.auto(LLAMA8B, H100, 2_000_000)


def test_auto_is_the_best_of_all_counts_on_a_small_model():
    """Exhaustive over every per-layer assignment of a 3-layer, 3-head rank:
    no placement holds the target with more resident head-layers, and the
    largest pool is the largest of all assignments."""
    kv = policy.RankKV((0, 1, 2), 3, 16, 1000, 10)
    for device, host in itertools.product([20_000, 55_000, 130_000], [30_000, 90_000]):
        budgets = policy.Budgets(device, host)
        every = list(itertools.product(range(4), repeat=3))
        best = max(policy.blocks_held(kv, c, budgets)[0] for c in every)
        assert policy.auto(kv, budgets, None).num_blocks == best
        for target_blocks in range(2, best + 1, 3):
            tokens = (target_blocks - 1) * 16
            p = policy.auto(kv, budgets, tokens)
            most = max(
                sum(c) for c in every if policy.blocks_held(kv, c, budgets)[0] >= target_blocks
            )
            assert p.resident_head_layers == most


def test_max_pool_keeps_the_most_resident_heads_among_equal_pools():
    """Among equal largest pools, the most resident head-layers: the least link traffic."""
    rng = random.Random(0)
    ties = 0
    for _ in range(200):
        layers, heads = rng.randint(1, 4), rng.randint(1, 3)
        kv = policy.RankKV(tuple(range(layers)), heads, 16, rng.choice([1000, 3000]),
                           rng.choice([10, 500]))
        budgets = policy.Budgets(rng.randint(1_000, 200_000), rng.randint(0, 200_000),
                                 rng.choice([0, 5_000]))
        p = policy.auto(kv, budgets, None)
        every = itertools.product(range(heads + 1), repeat=layers)
        equal = {sum(c) for c in every if policy.blocks_held(kv, c, budgets)[0] == p.num_blocks}
        assert p.resident_head_layers == max(equal), (kv, budgets, p.counts)
        ties += len(equal) > 1
    assert ties > 10  # the configurations do have equal pools to choose from


def test_uniform_only_keeps_every_head_resident():
    kv = policy.RankKV((0, 1, 2, 3), 4, 16, 1000, 10, uniform_only=True)
    assert policy.auto(kv, policy.Budgets(10**6, 10**6), 400).counts == (4, 4, 4, 4)
    with pytest.raises(policy.PlacementError):
        policy.auto(kv, policy.Budgets(50_000, 10**6), 400)


def test_summary_line():
    p = policy.auto(LLAMA8B, H100, 524_288)
    line = p.summary()
    assert line.startswith(f"{p.resident_head_layers}/256 KV head-layers resident per rank")
    assert "(8 KV heads x 32 layers: " in line
    assert f"pool {p.num_blocks} blocks = {p.tokens} tokens (limited by device)" in line
    mib = p.link_bytes_per_token() * 1024 / (1 << 20)
    assert f"decode reads {mib:.3f} MiB over the link per 1K tokens of context" in line
