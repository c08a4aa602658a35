"""The settings as every hook of one process reads them: parsed once per
value, parsed again where the settings or their environment fallbacks
change."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_headinfer.config import HeadInferConfig, HeadInferConfigError


def engine_config(**settings) -> SimpleNamespace:
    return SimpleNamespace(additional_config={"headinfer": settings})


def test_hooks_share_one_parse_of_the_same_settings():
    first = HeadInferConfig.from_vllm_config(engine_config(resident_kv_heads=[1, 0], cpu_kv_gib=2))
    again = HeadInferConfig.from_vllm_config(engine_config(resident_kv_heads=[1, 0], cpu_kv_gib=2))
    assert again is first
    assert first.resident_kv_heads == (1, 0) and first.cpu_kv_gib == 2


def test_other_settings_or_environment_parse_anew(monkeypatch):
    config = engine_config(resident_kv_heads=1)
    first = HeadInferConfig.from_vllm_config(config)
    config.additional_config["headinfer"]["resident_kv_heads"] = 2  # (startup resolves in place)
    assert HeadInferConfig.from_vllm_config(config).resident_kv_heads == 2
    monkeypatch.setenv("VLLM_HEADINFER_CPU_KV_GIB", "3")
    assert HeadInferConfig.from_vllm_config(engine_config(resident_kv_heads=1)).cpu_kv_gib == 3
    assert first.cpu_kv_gib != 3


def test_a_bad_value_is_refused_every_time():
    for _ in range(2):  # (a refusal is not remembered as a result)
        with pytest.raises(HeadInferConfigError, match="resident_kv_heads"):
            HeadInferConfig.from_vllm_config(engine_config(resident_kv_heads="two"))
