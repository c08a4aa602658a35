"""Installed beside a vLLM whose internals moved, the plugin stands aside.

The CPU build exists only for vLLM 0.32.0, so a newer vLLM is simulated: a
``sitecustomize`` on the runner's path removes ``get_kv_cache_configs`` from
``vllm.v1.core.kv_cache_utils`` (as 0.33 moved it) after the engine core has
imported its own reference. vLLM itself still works; the plugin must log one
warning naming the installed and supported versions, apply no patch, let the
default backend generate exactly what it generates where the plugin is
supported, and refuse HEADINFER in the user's process with that same line.
"""

from __future__ import annotations

import os
import random

import pytest
from conftest import RESULT_MARK, BASE_LLM, engine_ok, headinfer_llm, random_tokens, run_engines

MOVED = '''
import vllm.v1.engine.core  # keeps its own reference, as a moved vLLM's would
import vllm.v1.core.kv_cache_utils as kv_cache_utils

del kv_cache_utils.get_kv_cache_configs
'''
LLM = {**BASE_LLM, "max_model_len": 512, "kv_cache_memory_bytes": 32 << 20}
WARNING = "supports vLLM 0.32.0 through 0.34.x; this is vLLM 0.32.0"


def _spec(model: str) -> dict:
    rng = random.Random(3)
    reqs = [{"prompt_token_ids": random_tokens(rng, n), "max_tokens": 12} for n in (20, 90)]
    return {
        "inprocess": True,
        "paths": {"m": model},
        "scenarios": {"s": {"rounds": [reqs]}},
        "engines": [
            {"name": "default", "model": "m", "llm": LLM, "scenarios": ["s"]},
            {"name": "headinfer", "model": "m", "llm": {**LLM, **headinfer_llm(1)}, "scenarios": ["s"]},
        ],
    }


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory, monkeypatch_module):
    model = tiny_models("llama-gqa")
    supported, _ = run_engines(_spec(model), tmp_path_factory.mktemp("supported"), "supported")
    site = tmp_path_factory.mktemp("moved-vllm")
    (site / "sitecustomize.py").write_text(MOVED)
    monkeypatch_module.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH")) if p
    ))
    moved, output = run_engines(_spec(model), tmp_path_factory.mktemp("moved"), "moved")
    return supported, moved, output


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_default_backend_generates_as_where_supported(runs):
    supported, moved, _ = runs
    expected = engine_ok(supported, "default")["scenarios"]["s"][0]["outputs"]
    got = engine_ok(moved, "default")["scenarios"]["s"][0]["outputs"]
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]


def test_one_warning_names_the_versions(runs):
    _, _, output = runs
    logged = [ln for ln in output.splitlines() if WARNING in ln and not ln.startswith(RESULT_MARK)]
    assert len(logged) == 1, f"expected one warning, got {len(logged)}:\n" + "\n".join(logged)
    assert "get_kv_cache_configs is in neither" in logged[0]


def test_headinfer_is_refused_with_that_line(runs):
    supported, moved, _ = runs
    engine_ok(supported, "headinfer")
    err = moved["engines"]["headinfer"]["error"]
    assert err is not None, "HEADINFER started on a vLLM whose internals moved"
    assert err["type"] == "HeadInferConfigError", err
    assert WARNING in err["message"] and "\n" not in err["message"]
