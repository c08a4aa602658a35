"""FP8 KV cache (``--kv-cache-dtype fp8``) with HEADINFER on CPU engines.

vLLM's own CPU fp8 attention is no reference for HEADINFER's (see
tests/unit/test_fp8_pages.py, which checks the torch path's fp8 pages against
float64; the GPU tests compare with FLASH_ATTN's fp8 cache). So here HEADINFER
fp8 with R = 0, 1, H and auto give the same tokens and logprobs (within 1e-3)
as each other, so the host pool holds what the device pages hold; their
outputs are not float32's; the placement counts one byte per element (a
quarter of float32), and the planner prints the engine's own placement line.
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
    planned_line,
    random_tokens,
    run_engines,
)


H = 2  # KV heads of llama-gqa
LLM = {**BASE_LLM, "max_model_len": 1024, "max_num_batched_tokens": 64, "kv_cache_dtype": "fp8"}
# llama-gqa: 2 layers x 2 KV heads of 32 dims, 32-token blocks: 2 KiB per
# head-layer and block in fp8; 33 blocks hold the 1024-token pool. Room for 3
# of the 4 head-layers (what 3/4 of them take in float32 would hold only one).
AUTO_BUDGET = 33 * 3 * 2048 + 1024
ENGINES = {
    **{f"R{r}": {**LLM, **headinfer_llm(r, cpu_kv_gib=0.05), "kv_cache_memory_bytes": 16 << 20}
       for r in (0, 1, H)},
    "auto": {**LLM, **headinfer_llm(cpu_kv_gib=0.05), "kv_cache_memory_bytes": AUTO_BUDGET},
    "R0-fp32": {**LLM, **headinfer_llm(0, cpu_kv_gib=0.05), "kv_cache_memory_bytes": 16 << 20,
                "kv_cache_dtype": "auto"},
}


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    rng = random.Random(11)
    batch = [
        {"prompt_token_ids": random_tokens(rng, 200), "max_tokens": 24},  # prefill chunks
        {"prompt_token_ids": random_tokens(rng, 33), "max_tokens": 20},
        {"prompt_token_ids": random_tokens(rng, 5), "max_tokens": 16},
    ]
    engines = [{"name": n, "model": "m", "llm": llm, "scenarios": ["s"], "prompt_logprobs": True}
               for n, llm in ENGINES.items()]
    spec = {"inprocess": True, "paths": {"m": tiny_models("llama-gqa")},
            "scenarios": {"s": {"rounds": [batch]}}, "engines": engines}
    out, _ = run_engines(spec, tmp_path_factory.mktemp("fp8"), "fp8", timeout=600)
    return out


def _outputs(results, name):
    return engine_ok(results, name)["scenarios"]["s"][0]["outputs"]


@pytest.mark.parametrize("name", ["R0", "R1", "auto"])
def test_offloaded_fp8_heads_match_device_fp8_heads(results, name):
    assert_same_outputs(_outputs(results, f"R{H}"), _outputs(results, name), f"{name} vs R{H} (fp8)")


def test_fp8_is_in_effect(results):
    """The fp8 engines' outputs are not float32's, and every KV byte counts
    once: the host pool of R0 is a quarter of float32's."""
    fp8, fp32 = _outputs(results, "R0"), _outputs(results, "R0-fp32")
    diffs = [abs(a - b) for x, y in zip(fp8, fp32) for a, b in zip(x["prompt_logprobs"][1:], y["prompt_logprobs"][1:])]
    assert max(diffs) > 1e-4
    p8 = placement_of(engine_ok(results, "R0")["headinfer_log"])
    p32 = placement_of(engine_ok(results, "R0-fp32")["headinfer_log"])
    assert p8["link_mib_per_1k"] * 4 == pytest.approx(p32["link_mib_per_1k"], rel=1e-3)


def test_auto_places_by_fp8_bytes(results, tiny_models):
    p = placement_of(engine_ok(results, "auto")["headinfer_log"])
    assert p["counts"] == [2, 1], p
    line = planned_line(tiny_models("llama-gqa"), ENGINES["auto"])
    engine_line = [ln for ln in engine_ok(results, "auto")["headinfer_log"] if "HEADINFER placement" in ln][-1]
    assert line == engine_line
