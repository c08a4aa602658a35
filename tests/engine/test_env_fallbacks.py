"""VLLM_HEADINFER_* environment variables fill settings additional_config omits,
and the backend can be selected through attention_config as well.

The placement log line and the resolved settings (written back into
additional_config for every engine process) show which values took effect.
"""

from __future__ import annotations

import random

import psutil
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

LLM = {**BASE_LLM, "max_model_len": 1024, "kv_cache_memory_bytes": 64 << 20}
R_ENV = "VLLM_HEADINFER_RESIDENT_KV_HEADS"
GIB_ENV = "VLLM_HEADINFER_CPU_KV_GIB"

ENGINES = {
    # name: (LLM kwargs, env)
    "default": ({}, {}),
    "env-only": (headinfer_llm(), {R_ENV: "1", GIB_ENV: "0.02"}),
    "env-no-additional-config": ({"attention_backend": "HEADINFER"}, {R_ENV: "1", GIB_ENV: "0.03"}),
    "explicit-beats-env": (headinfer_llm(0, cpu_kv_gib=0.04), {R_ENV: "1", GIB_ENV: "0.02"}),
    "env-resident-only": (headinfer_llm(cpu_kv_gib=0.02), {R_ENV: "2"}),
    "attention-config-dict": (
        {
            "attention_config": {"backend": "HEADINFER"},
            "additional_config": {"headinfer": {"resident_kv_heads": 1, "cpu_kv_gib": 0.02}},
        },
        {},
    ),
}


@pytest.fixture(scope="module")
def env_results(tiny_models, tmp_path_factory):
    prompts = [
        {"prompt_token_ids": random_tokens(random.Random(3), n), "max_tokens": 12} for n in (5, 90, 300)
    ]
    engines = [
        {"name": name, "model": "m", "llm": {**LLM, **kwargs}, "env": env, "scenarios": ["s"]}
        for name, (kwargs, env) in ENGINES.items()
    ]
    # The default budget (half the free RAM) would make a multi-GiB host pool:
    # resolving the config shows the default without allocating it.
    engines.append(
        {"name": "nothing-set", "model": "m", "llm": {**LLM, "attention_backend": "HEADINFER"},
         "config_only": True}
    )
    spec = {
        "inprocess": True,
        "paths": {"m": tiny_models("llama-gqa")},
        "scenarios": {"s": {"rounds": [prompts]}},
        "engines": engines,
    }
    results, _ = run_engines(spec, tmp_path_factory.mktemp("env"), "env", timeout=600)
    return results


@pytest.mark.parametrize(
    "name,resident,gib",
    [
        ("env-only", 1, 0.02),
        ("env-no-additional-config", 1, 0.03),
        ("explicit-beats-env", 0, 0.04),
        ("env-resident-only", 2, 0.02),
        ("attention-config-dict", 1, 0.02),
    ],
)
def test_env_fallback_takes_effect(env_results, name, resident, gib):
    res = engine_ok(env_results, name)
    settings = res["config"]["additional_config"]["headinfer"]
    assert settings["resident_kv_heads"] == resident
    assert settings["cpu_kv_gib"] == pytest.approx(gib)
    p = placement_of(res["headinfer_log"])
    assert p["resident"] == resident
    if resident < p["heads"]:
        # 64 MiB of device KV holds more blocks than the host budget: the
        # host pool is exactly cpu_kv_gib.
        assert p["limited_by"] == "host (cpu_kv_gib)"
        assert p["host_gib"] == pytest.approx(gib, abs=0.001)
    else:
        assert p["host_gib"] == 0
    base = engine_ok(env_results, "default")
    assert_same_outputs(base["scenarios"]["s"][0]["outputs"], res["scenarios"]["s"][0]["outputs"], name)


def test_defaults_without_settings(env_results):
    """No setting anywhere: resident_kv_heads auto, cpu_kv_gib half the free RAM
    (less where the startup limit, which keeps room for the engine, is lower)."""
    res = engine_ok(env_results, "nothing-set")
    settings = res["config"]["additional_config"]["headinfer"]
    assert settings["resident_kv_heads"] == "auto"
    free_gib = psutil.virtual_memory().available / (1 << 30)
    assert 0 < settings["cpu_kv_gib"] <= free_gib / 2 * 1.25
    if free_gib >= 16:  # the limit is above half the free RAM here
        assert settings["cpu_kv_gib"] == pytest.approx(free_gib / 2, rel=0.25)
