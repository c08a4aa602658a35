"""Capacity: HEADINFER serves contexts the device KV budget alone cannot hold.

The model (Llama, 2 layers, 2 KV heads of 32 dims, float32) needs 1 KiB of KV
per token. With a 1 MiB device KV budget the default backend holds about 1000
tokens and refuses max_model_len=4096; HEADINFER with resident_kv_heads=0 keeps
only a tiny placeholder page per block on the device, holds the KV in
``cpu_kv_gib`` of host memory, and serves a 3000-token prompt with the same
output as the default backend given a large budget. A max_model_len that
cpu_kv_gib cannot hold is refused at startup, naming cpu_kv_gib.

These engines run in vLLM's default multi-process mode (engine core and worker
in spawned processes), the path users take.
"""

from __future__ import annotations

import random

import pytest
from conftest import (
    BASE_LLM,
    assert_same_outputs,
    engine_ok,
    headinfer_llm,
    placement_of,
    random_tokens,
    run_engines,
)

MAX_MODEL_LEN = 4096
PROMPT_LEN = 3000
SMALL_KV = 1 << 20  # 1 MiB: ~1000 tokens of this model's KV
LARGE_KV = 64 << 20
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 32 * 4  # layers * kv heads * (K+V) * dims * fp32
CPU_KV_GIB = 0.01  # ~10 MiB: ~10000 tokens
TOO_SMALL_CPU_KV_GIB = 0.001  # ~1 MiB: ~1000 tokens < MAX_MODEL_LEN

LLM = {
    **BASE_LLM,
    "max_model_len": MAX_MODEL_LEN,
    "max_num_batched_tokens": 512,
    "enable_prefix_caching": False,
}


@pytest.fixture(scope="module")
def capacity(tiny_models, tmp_path_factory):
    prompt = random_tokens(random.Random(7), PROMPT_LEN)
    engines = [
        {"name": "default-small", "model": "m", "llm": {**LLM, "kv_cache_memory_bytes": SMALL_KV}},
        {
            "name": "headinfer-small",
            "model": "m",
            "llm": {**LLM, "kv_cache_memory_bytes": SMALL_KV, **headinfer_llm(0, cpu_kv_gib=CPU_KV_GIB)},
            "scenarios": ["long"],
        },
        {
            "name": "headinfer-cpu-too-small",
            "model": "m",
            "llm": {
                **LLM,
                "kv_cache_memory_bytes": SMALL_KV,
                **headinfer_llm(0, cpu_kv_gib=TOO_SMALL_CPU_KV_GIB),
            },
        },
        {
            "name": "default-large",
            "model": "m",
            "llm": {**LLM, "kv_cache_memory_bytes": LARGE_KV},
            "scenarios": ["long"],
        },
    ]
    spec = {
        "inprocess": False,
        "paths": {"m": tiny_models("llama-gqa")},
        "scenarios": {"long": {"rounds": [[{"prompt_token_ids": prompt, "max_tokens": 16}]]}},
        "engines": engines,
    }
    results, output = run_engines(spec, tmp_path_factory.mktemp("capacity"), "capacity", timeout=600)
    return results, output


def test_default_backend_refuses_small_budget(capacity):
    results, output = capacity
    err = results["engines"]["default-small"]["error"]
    assert err is not None, "the default backend started with a 1 MiB KV budget"
    # vLLM's own startup check, logged by the engine core.
    assert "larger than the available KV cache memory" in output
    assert SMALL_KV // KV_BYTES_PER_TOKEN < PROMPT_LEN < MAX_MODEL_LEN


def test_headinfer_serves_beyond_device_budget(capacity):
    results, output = capacity
    hi = engine_ok(results, "headinfer-small")
    base = engine_ok(results, "default-large")
    assert hi["config"]["backend"] == "HEADINFER"
    assert base["config"]["backend"] is None
    (hi_round,) = hi["scenarios"]["long"]
    (base_round,) = base["scenarios"]["long"]
    assert len(hi_round["outputs"][0]["token_ids"]) == 16
    assert_same_outputs(base_round["outputs"], hi_round["outputs"], "3000-token prompt")

    lines = [ln for ln in output.splitlines() if "HEADINFER placement" in ln]
    p = placement_of(lines)
    assert (p["resident"], p["heads"], p["offloaded"]) == (0, 2, 2)
    assert p["limited_by"] == "host (cpu_kv_gib)"
    assert p["tokens"] >= PROMPT_LEN + 16
    # Host pool is what cpu_kv_gib allows; the device holds only placeholders.
    assert p["host_gib"] == pytest.approx(CPU_KV_GIB, abs=0.001)
    assert p["device_gib"] * (1 << 30) <= SMALL_KV


def test_max_model_len_beyond_cpu_kv_gib_is_refused(capacity):
    results, _ = capacity
    err = results["engines"]["headinfer-cpu-too-small"]["error"]
    assert err is not None, "started although cpu_kv_gib cannot hold max_model_len"
    # Refused while the engine config is built, so LLM(...) itself raises it.
    assert f"max_model_len={MAX_MODEL_LEN}" in err["message"], err["message"]
    assert "cpu_kv_gib" in err["message"] and str(TOO_SMALL_CPU_KV_GIB) in err["message"]


AUTO_CPU_KV_GIB = 0.002  # 65 blocks of 32 tokens


@pytest.fixture(scope="module")
def capacity_inprocess(tiny_models, tmp_path_factory):
    """Startup-time capacity decisions, with the engine core in-process so the
    engine core's errors reach LLM(...) as they are."""
    prompt = random_tokens(random.Random(8), 1900)
    small_host = {**LLM, "kv_cache_memory_bytes": LARGE_KV}
    engines = [
        {
            "name": "auto-max-model-len",
            "model": "m",
            "llm": {**small_host, "max_model_len": -1, **headinfer_llm(0, cpu_kv_gib=AUTO_CPU_KV_GIB)},
            "scenarios": ["long"],
        },
        {
            "name": "default-auto-max-model-len",
            "model": "m",
            "llm": {**small_host, "max_model_len": -1},
            "scenarios": ["long"],
        },
        {
            "name": "override-beyond-host",
            "model": "m",
            "llm": {
                **small_host,
                "max_model_len": 1024,
                "num_gpu_blocks_override": 500,
                **headinfer_llm(0, cpu_kv_gib=AUTO_CPU_KV_GIB),
            },
        },
        {
            "name": "max-model-len-beyond-host",
            "model": "m",
            # R=1 of 2: 16 KiB of host KV per block, 65 blocks < 4096 tokens.
            "llm": {**small_host, **headinfer_llm(1, cpu_kv_gib=TOO_SMALL_CPU_KV_GIB)},
        },
    ]
    spec = {
        "inprocess": True,
        "paths": {"m": tiny_models("llama-gqa")},
        "scenarios": {"long": {"rounds": [[{"prompt_token_ids": prompt, "max_tokens": 8}]]}},
        "engines": engines,
    }
    results, _ = run_engines(spec, tmp_path_factory.mktemp("capacity-inprocess"), "capacity-inprocess")
    return results


def test_auto_max_model_len_fits_the_host_budget(capacity_inprocess):
    hi = engine_ok(capacity_inprocess, "auto-max-model-len")
    base = engine_ok(capacity_inprocess, "default-auto-max-model-len")
    p = placement_of(hi["headinfer_log"])
    assert p["limited_by"] == "host (cpu_kv_gib)"
    # Auto-fit used the host-limited capacity, not the 64 MiB device budget...
    assert 1900 + 8 <= hi["config"]["max_model_len"] <= p["tokens"]
    # ...which alone fits the model's whole context.
    assert base["config"]["max_model_len"] == 8192
    assert_same_outputs(
        base["scenarios"]["long"][0]["outputs"], hi["scenarios"]["long"][0]["outputs"], "auto-fit"
    )


@pytest.mark.parametrize("name", ["override-beyond-host", "max-model-len-beyond-host"])
def test_host_budget_refusals_name_cpu_kv_gib(capacity_inprocess, name):
    err = capacity_inprocess["engines"][name]["error"]
    assert err is not None, f"{name} started"
    assert "cpu_kv_gib" in err["message"], err["message"]
