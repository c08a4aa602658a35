"""Automatic and per-layer placement against the default backend.

The model has 16 layers of 8 KV heads (head size 32, float32): 128
head-layers of 8 KiB per 32-token block, 32 KiB of KV per token. Device
budgets are chosen so that auto placement gives layers different resident
counts (40 head-layers: 3 in layers 0-7, 2 in 8-15), under chunked prefill
with prefix caching and under forced preemption; an explicit per-layer list
runs the same prompts. Each must give the default backend's greedy tokens and
logprobs within 1e-3.

Also: ``kv_pool_tokens: "max"`` (and ``--max-model-len auto``) reach the two
budgets' sum within 2%; a pool the device holds alone keeps every head
resident and allocates no host pool; the planner prints the engine's own
placement line for the same flags.
"""

from __future__ import annotations

import pytest
from conftest import (
    BASE_LLM,
    assert_same_outputs,
    engine_ok,
    headinfer_llm,
    placement_of,
    planned_line,
    run_engines,
)
from test_equivalence import ENGINE_SETTINGS, SCENARIOS_OF, make_scenarios

SHAPE = dict(arch="llama", num_layers=16, num_heads=8, num_kv_heads=8, head_dim=32)
HEAD_BLOCK = 32 * 2 * 32 * 4  # one head-layer's K+V of one block
TOKEN_BYTES = 16 * 8 * 2 * 32 * 4  # KV per token over all head-layers
CPU_KV_GIB = 0.1
UNEVEN = [3] * 8 + [2] * 8  # 40 head-layers resident
# A device budget between 40 and 41 resident head-layers' pages of `blocks`.
uneven_budget = lambda blocks: blocks * HEAD_BLOCK * 81 // 2  # noqa: E731
POOL = 4096  # kv_pool_tokens of the uneven engines: 129 blocks
LIST = [8, 0, 5, 1, 2, 0, 7, 3, 0, 8, 4, 6, 1, 0, 2, 5]
MAX_DEVICE, MAX_HOST_GIB = 64 << 20, 0.25


def _hi(**headinfer) -> dict:
    return headinfer_llm(**{"cpu_kv_gib": CPU_KV_GIB, **headinfer})


ENGINES = {
    # name: (setting, LLM kwargs beyond the setting's, scenarios)
    "default-pc": ("pc", {"kv_cache_memory_bytes": 128 << 20}),
    "default-preempt": ("preempt", {}),
    "auto-pc": ("pc", {"kv_cache_memory_bytes": uneven_budget(129), **_hi(kv_pool_tokens=POOL)}),
    "auto-preempt": ("preempt", {"kv_cache_memory_bytes": uneven_budget(40), **_hi()}),
    "list-pc": ("pc", {"kv_cache_memory_bytes": 128 << 20, **_hi(resident_kv_heads=LIST)}),
    "all-resident-pc": ("pc", {"kv_cache_memory_bytes": 128 << 20, **_hi()}),
}
PLAN_ENGINES = {
    "max": {"kv_cache_memory_bytes": MAX_DEVICE, **headinfer_llm(cpu_kv_gib=MAX_HOST_GIB, kv_pool_tokens="max")},
    "max-model-len-auto": {
        "kv_cache_memory_bytes": MAX_DEVICE,
        "max_model_len": -1,
        **headinfer_llm(cpu_kv_gib=MAX_HOST_GIB),
    },
}


@pytest.fixture(scope="module")
def model_path(model_dir):
    from vllm_headinfer.tiny_model import build_tiny_model

    return str(build_tiny_model(model_dir / "llama-16x8", **SHAPE))


@pytest.fixture(scope="module")
def results(model_path, tmp_path_factory):
    engines = []
    for name, (setting, extra) in ENGINES.items():
        engines.append(
            {
                "name": name,
                "model": "m",
                "llm": {**BASE_LLM, **ENGINE_SETTINGS[setting], **extra},
                "scenarios": SCENARIOS_OF[setting],
            }
        )
    for name, extra in PLAN_ENGINES.items():
        llm = {**BASE_LLM, **ENGINE_SETTINGS["pc"], **extra}
        engines.append({"name": name, "model": "m", "llm": llm, "scenarios": ["chunked"]})
    spec = {
        "inprocess": True,
        "paths": {"m": model_path},
        "scenarios": make_scenarios(),
        "engines": engines,
    }
    out, _ = run_engines(spec, tmp_path_factory.mktemp("auto"), "auto", timeout=1200)
    return out


def _compare(results, name):
    setting = ENGINES[name][0]
    base = engine_ok(results, f"default-{setting}")
    hi = engine_ok(results, name)
    assert hi["config"]["backend"] == "HEADINFER"
    for scenario in SCENARIOS_OF[setting]:
        for i, (b, h) in enumerate(zip(base["scenarios"][scenario], hi["scenarios"][scenario])):
            assert_same_outputs(b["outputs"], h["outputs"], f"{name} {scenario} round {i}")
    return hi


def test_auto_uneven_counts_match_default_backend(results):
    hi = _compare(results, "auto-pc")
    p = placement_of(hi["headinfer_log"])
    assert p["counts"] == UNEVEN
    assert p["heads"] == 8 and p["layers"] == 16
    assert p["limited_by"] == "device"
    assert p["blocks"] >= POOL // 32 + 1
    assert hi["host_pool_bytes"] == p["blocks"] * (128 - 40) * HEAD_BLOCK
    second = hi["scenarios"]["prefix"][1]
    assert second["metrics"]["vllm:prefix_cache_hits"] > 0


def test_auto_uneven_counts_under_preemption(results):
    hi = _compare(results, "auto-preempt")
    p = placement_of(hi["headinfer_log"])
    # The pool must hold num_gpu_blocks_override blocks: 40.
    assert p["counts"] == UNEVEN and p["blocks"] == 40
    (rnd,) = hi["scenarios"]["preempt"]
    assert rnd["metrics"]["vllm:num_preemptions"] > 0


def test_explicit_per_layer_list(results):
    hi = _compare(results, "list-pc")
    p = placement_of(hi["headinfer_log"])
    assert p["counts"] == LIST
    assert hi["host_pool_bytes"] == p["blocks"] * (128 - sum(LIST)) * HEAD_BLOCK


def test_device_holds_the_pool_so_nothing_is_offloaded(results):
    hi = _compare(results, "all-resident-pc")
    p = placement_of(hi["headinfer_log"])
    assert p["counts"] == [8] * 16
    assert p["host_gib"] == 0 and p["link_mib_per_1k"] == 0
    assert hi["host_pool_bytes"] == 0
    # Same blocks as the default backend with the same budget.
    assert hi["config"]["num_gpu_blocks"] == engine_ok(results, "default-pc")["config"]["num_gpu_blocks"]


@pytest.mark.parametrize("name", list(PLAN_ENGINES))
def test_max_pool_reaches_both_budgets(results, name):
    hi = engine_ok(results, name)
    p = placement_of(hi["headinfer_log"])
    ideal = (MAX_DEVICE + MAX_HOST_GIB * (1 << 30)) / TOKEN_BYTES
    assert 0.98 * ideal <= p["tokens"] <= ideal
    assert 0 < p["resident_head_layers"] < 128
    if name == "max-model-len-auto":
        # vLLM's auto-fit takes the longest length the pool holds, up to
        # the model's 8192 positions.
        longest = min(p["tokens"], 8192)
        assert longest - 32 < hi["config"]["max_model_len"] <= longest


@pytest.mark.parametrize("name", ["auto-pc", "list-pc", "all-resident-pc"])
def test_planner_prints_the_engine_placement(results, model_path, name):
    setting, extra = ENGINES[name]
    line = planned_line(model_path, {**BASE_LLM, **ENGINE_SETTINGS[setting], **extra})
    engine_line = [ln for ln in engine_ok(results, name)["headinfer_log"] if "HEADINFER placement" in ln][-1]
    assert line == engine_line
