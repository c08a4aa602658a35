"""A sustained run: 200 requests of random lengths through a pool small
enough that the scheduler must preempt, with HEADINFER (auto placement,
which offloads part of every layer) and the default backend under the same
pool size. Every request completes with all its tokens, preemption happened,
and every output equals the default backend's."""

from __future__ import annotations

import random

import pytest
from conftest import BASE_LLM, assert_same_outputs, engine_ok, headinfer_llm, placement_of, random_tokens, run_engines

BLOCKS = 48  # 47 usable blocks of 32 tokens: 1504 tokens for up to 200 requests
LLM = {**BASE_LLM, "max_model_len": 1024, "max_num_batched_tokens": 256, "enable_prefix_caching": False,
       "num_gpu_blocks_override": BLOCKS}
# Room on the device for 3 of llama-gqa's 4 head-layers (8 KiB each per block).
AUTO_BUDGET = BLOCKS * 3 * 8192 + 4096


@pytest.fixture(scope="module")
def load(tiny_models, tmp_path_factory):
    rng = random.Random(42)
    requests = [
        {"prompt_token_ids": random_tokens(rng, rng.randint(1, 600)), "max_tokens": rng.randint(1, 40)}
        for _ in range(200)
    ]
    spec = {
        "inprocess": True,
        "paths": {"m": tiny_models("llama-gqa")},
        "scenarios": {"load": {"rounds": [requests]}},
        "engines": [
            {"name": "default", "model": "m", "llm": {**LLM, "kv_cache_memory_bytes": 64 << 20},
             "scenarios": ["load"]},
            {"name": "auto", "model": "m",
             "llm": {**LLM, "kv_cache_memory_bytes": AUTO_BUDGET, **headinfer_llm(cpu_kv_gib=0.05)},
             "scenarios": ["load"]},
        ],
    }
    results, _ = run_engines(spec, tmp_path_factory.mktemp("load"), "load", timeout=1200)
    return requests, results


def test_every_request_completes_and_matches(load):
    requests, results = load
    base, hi = engine_ok(results, "default"), engine_ok(results, "auto")
    p = placement_of(hi["headinfer_log"])
    assert p["counts"] == [2, 1] and p["blocks"] == BLOCKS
    (rnd,) = hi["scenarios"]["load"]
    assert rnd["metrics"]["vllm:num_preemptions"] > 0, rnd["metrics"]
    outs = rnd["outputs"]
    assert [len(o["token_ids"]) for o in outs] == [r["max_tokens"] for r in requests]
    assert_same_outputs(base["scenarios"]["load"][0]["outputs"], outs, "200 requests")
