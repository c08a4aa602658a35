"""Engines started and shut down again in one process leave nothing behind.

Three ``LLM(...)`` start/stop cycles in one process (engine core and worker
in-process), each with a 512 MiB host pool: after each shutdown no host pool
is held and the process's RSS stays flat (far below one pool's size of
growth), and each cycle generates the same tokens.
"""

from __future__ import annotations

import pytest
from conftest import BASE_LLM, engine_ok, headinfer_llm, random_tokens, run_engines

POOL_GIB = 0.5
CYCLES = 3


@pytest.fixture(scope="module")
def cycles(tiny_models, tmp_path_factory):
    import random

    llm = {**BASE_LLM, "max_model_len": 1024, "kv_cache_memory_bytes": 64 << 20,
           **headinfer_llm(0, cpu_kv_gib=POOL_GIB)}
    prompt = random_tokens(random.Random(9), 300)
    spec = {
        "inprocess": True,
        "paths": {"m": tiny_models("llama-gqa")},
        "scenarios": {"s": {"rounds": [[{"prompt_token_ids": prompt, "max_tokens": 8}]]}},
        "engines": [
            {"name": f"cycle{i}", "model": "m", "llm": llm, "scenarios": ["s"]} for i in range(CYCLES)
        ],
    }
    results, _ = run_engines(spec, tmp_path_factory.mktemp("lifecycle"), "lifecycle")
    return [engine_ok(results, f"cycle{i}") for i in range(CYCLES)]


def test_each_shutdown_releases_the_host_pool(cycles):
    for res in cycles:
        assert res["host_pool_bytes"] == int(POOL_GIB * (1 << 30))
        assert res["after_shutdown"]["host_pool_bytes"] == 0


def test_rss_stays_flat(cycles):
    rss = [res["after_shutdown"]["rss_bytes"] for res in cycles]
    assert rss[-1] - rss[0] < (64 << 20), [r >> 20 for r in rss]


def test_every_cycle_generates_the_same(cycles):
    first = cycles[0]["scenarios"]["s"][0]["outputs"]
    for res in cycles[1:]:
        assert res["scenarios"]["s"][0]["outputs"][0]["token_ids"] == first[0]["token_ids"]
