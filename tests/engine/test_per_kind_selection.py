"""A model with sliding-window layers: HEADINFER for its full-attention layers.

HEADINFER refuses sliding-window layers, and its startup error suggests
selecting it per layer kind instead:
``--attention-config '{"backend_per_kind": {"full_attention": "HEADINFER"}}'``.
This checks that path on a Gemma2-style model (sliding-window and full layers
alternate): only the full layer is offloaded, and the output equals the
default backend's, with prompts longer than the window under chunked prefill.
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

WINDOW = 64
LLM = {
    **BASE_LLM,
    "max_model_len": 1024,
    "kv_cache_memory_bytes": 64 << 20,
    "max_num_batched_tokens": 64,
}
PER_KIND = {"attention_config": {"backend_per_kind": {"full_attention": "HEADINFER"}}}


@pytest.fixture(scope="module")
def per_kind(model_dir, tmp_path_factory):
    from vllm_headinfer.tiny_model import build_tiny_model

    path = build_tiny_model(
        model_dir / "gemma2-sliding",
        "gemma2",
        num_heads=4,
        num_kv_heads=2,
        extra_config={"sliding_window": WINDOW},
    )
    rng = random.Random(21)
    prompts = [{"prompt_token_ids": random_tokens(rng, n), "max_tokens": 16} for n in (10, 70, 200, 500)]
    settings = lambda r: {"additional_config": {"headinfer": {"resident_kv_heads": r, "cpu_kv_gib": 0.05}}}  # noqa: E731
    engines = [
        {"name": "default", "model": "m", "llm": LLM, "scenarios": ["s"]},
        {"name": "R0", "model": "m", "llm": {**LLM, **PER_KIND, **settings(0)}, "scenarios": ["s"]},
        {"name": "R1", "model": "m", "llm": {**LLM, **PER_KIND, **settings(1)}, "scenarios": ["s"]},
        # With layers of another kind, auto keeps every head resident.
        {"name": "auto", "model": "m", "llm": {**LLM, **PER_KIND, **settings("auto")},
         "scenarios": ["s"]},
        {"name": "global", "model": "m", "llm": {**LLM, **headinfer_llm(0, cpu_kv_gib=0.05)}},
    ]
    spec = {
        "inprocess": True,
        "paths": {"m": str(path)},
        "scenarios": {"s": {"rounds": [prompts]}},
        "engines": engines,
    }
    results, _ = run_engines(spec, tmp_path_factory.mktemp("per-kind"), "per-kind")
    return results


@pytest.mark.parametrize("resident", [0, 1, "auto"])
def test_full_attention_layers_only(per_kind, resident):
    base = engine_ok(per_kind, "default")
    hi = engine_ok(per_kind, "auto" if resident == "auto" else f"R{resident}")
    if resident == "auto":
        resident = 2  # every head: see placement.RankKV.uniform_only
    p = placement_of(hi["headinfer_log"])
    # Two layers, one of them full attention: only that one is split.
    assert (p["resident"], p["heads"], p["layers"]) == (resident, 2, 1)
    # vLLM enlarges the full-attention group's blocks to match the sliding
    # window's pages; the host pool is sized on those blocks and stays
    # within cpu_kv_gib.
    assert p["host_gib"] <= 0.05 + 1e-3
    assert hi["host_pool_bytes"] <= 0.05 * (1 << 30)
    assert_same_outputs(
        base["scenarios"]["s"][0]["outputs"], hi["scenarios"]["s"][0]["outputs"], f"R={resident}"
    )


def test_global_selection_is_refused_with_the_per_kind_hint(per_kind):
    err = per_kind["engines"]["global"]["error"]
    assert err is not None and err["type"] == "HeadInferConfigError"
    assert "sliding-window" in err["message"] and "backend_per_kind" in err["message"]
