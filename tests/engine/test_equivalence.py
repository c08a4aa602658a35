"""HEADINFER gives the same greedy tokens and logprobs as the default backend.

For every model shape (Llama and Qwen2, GQA ratio 1 and 2) and resident count
(0, 1, H-1, H), HEADINFER is compared with the CPU platform's default backend
(CPU_ATTN: no attention_backend given) on the same prompts under three engine
settings:

* ``pc``: prefix caching on, chunked prefill (64 tokens a step): a batch of
  mixed prompt lengths, a 700-token prompt alone, and a second round of prompts
  sharing long prefixes with the first (prefix-cache hits are asserted);
* ``nopc``: prefix caching off, same prompts, prompt logprobs compared too;
* ``preempt``: a 40-block pool and six concurrent long requests, so the
  scheduler must preempt (asserted from vllm:num_preemptions).

All engines of one model shape run in one runner process with the engine core
in-process, so an engine costs seconds; the default backend's results are
computed once per shape and session and shared by all its tests.
"""

from __future__ import annotations

import random

import pytest
from conftest import (
    BASE_LLM,
    MODEL_SHAPES,
    assert_same_outputs,
    engine_ok,
    headinfer_llm,
    placement_of,
    random_tokens,
    resident_counts,
    run_engines,
)

MAX_NUM_BATCHED_TOKENS = 64
PREEMPT_BLOCKS = 40
CPU_KV_GIB = 0.05

ENGINE_SETTINGS = {
    "pc": dict(
        max_model_len=1024,
        kv_cache_memory_bytes=64 << 20,
        enable_prefix_caching=True,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    ),
    "nopc": dict(
        max_model_len=1024,
        kv_cache_memory_bytes=64 << 20,
        enable_prefix_caching=False,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    ),
    "preempt": dict(
        max_model_len=1024,
        kv_cache_memory_bytes=64 << 20,
        enable_prefix_caching=False,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        num_gpu_blocks_override=PREEMPT_BLOCKS,
    ),
}
SCENARIOS_OF = {
    "pc": ["mixed", "chunked", "prefix"],
    "nopc": ["mixed", "prefix"],
    "preempt": ["preempt"],
}


def make_scenarios() -> dict:
    rng = random.Random(1234)
    t = lambda n: random_tokens(rng, n)  # noqa: E731
    mixed = [
        {"prompt_token_ids": t(n), "max_tokens": m}
        for n, m in [(3, 24), (17, 20), (40, 16), (100, 24), (257, 12), (600, 8)]
    ]
    long_a, long_b = t(300), t(200)
    first = [
        {"prompt_token_ids": long_a + t(20), "max_tokens": 16},
        {"prompt_token_ids": long_b + t(45), "max_tokens": 16},
    ]
    second = [
        # 300 shared tokens: 9 full blocks of 32 can come from the cache.
        {"prompt_token_ids": long_a + t(33), "max_tokens": 16},
        # A shared prefix that ends inside a block.
        {"prompt_token_ids": long_a[:150] + t(80), "max_tokens": 16},
        {"prompt_token_ids": long_b + t(7), "max_tokens": 16},
        # A prompt seen before, in full.
        dict(first[1]),
    ]
    preempt = [{"prompt_token_ids": t(300), "max_tokens": 120} for _ in range(6)]
    return {
        "mixed": {"rounds": [mixed]},
        "chunked": {"rounds": [[{"prompt_token_ids": t(700), "max_tokens": 20}]]},
        "prefix": {"rounds": [first, second]},
        "preempt": {"rounds": [preempt]},
    }


def engine_name(setting: str, resident: int | None) -> str:
    return f"{setting}-default" if resident is None else f"{setting}-R{resident}"


def shape_spec(key: str, model_path: str) -> dict:
    heads = MODEL_SHAPES[key]["num_kv_heads"]
    engines = []
    for setting, llm in ENGINE_SETTINGS.items():
        for resident in [None, *resident_counts(heads)]:
            kwargs = {**BASE_LLM, **llm}
            if resident is not None:
                kwargs.update(headinfer_llm(resident, cpu_kv_gib=CPU_KV_GIB))
            engines.append(
                {
                    "name": engine_name(setting, resident),
                    "model": key,
                    "llm": kwargs,
                    "scenarios": SCENARIOS_OF[setting],
                    "prompt_logprobs": setting == "nopc",
                }
            )
    return {
        "inprocess": True,
        "models": {key: {"path": model_path, **MODEL_SHAPES[key]}},
        "scenarios": make_scenarios(),
        "engines": engines,
    }


@pytest.fixture(scope="session")
def shape_results(tiny_models, tmp_path_factory):
    """key -> runner results for all engines of that model shape (cached)."""
    cache: dict[str, dict] = {}
    workdir = tmp_path_factory.mktemp("equivalence")

    def get(key: str) -> dict:
        if key not in cache:
            results, _ = run_engines(shape_spec(key, tiny_models(key)), workdir, key, timeout=900)
            cache[key] = results
        return cache[key]

    return get


CASES = [
    (key, resident, setting)
    for key, shape in MODEL_SHAPES.items()
    for resident in resident_counts(shape["num_kv_heads"])
    for setting in ENGINE_SETTINGS
]


@pytest.mark.parametrize(
    "key,resident,setting", CASES, ids=[f"{k}-R{r}-{s}" for k, r, s in CASES]
)
def test_same_tokens_and_logprobs(shape_results, key, resident, setting):
    results = shape_results(key)
    base = engine_ok(results, engine_name(setting, None))
    hi = engine_ok(results, engine_name(setting, resident))

    # The comparison means something only if each side ran the backend it names.
    assert base["config"]["backend"] is None
    assert base["headinfer_log"] == [], "the default backend logged HEADINFER lines"
    assert hi["config"]["backend"] == "HEADINFER"
    heads = MODEL_SHAPES[key]["num_kv_heads"]
    placement = placement_of(hi["headinfer_log"])
    assert (placement["resident"], placement["heads"]) == (resident, heads)
    assert placement["offloaded"] == heads - resident

    for scenario in SCENARIOS_OF[setting]:
        for i, (b, h) in enumerate(zip(base["scenarios"][scenario], hi["scenarios"][scenario])):
            assert_same_outputs(
                b["outputs"], h["outputs"], f"{key} R={resident} {setting}/{scenario} round {i}"
            )


@pytest.mark.parametrize("key", list(MODEL_SHAPES))
def test_scenarios_exercise_what_they_claim(shape_results, key):
    """Chunked prefill ran, prefix caching hit (or stayed off), and the small
    pool preempted, for the default backend and every HEADINFER engine."""
    results = shape_results(key)
    heads = MODEL_SHAPES[key]["num_kv_heads"]
    for resident in [None, *resident_counts(heads)]:
        pc = engine_ok(results, engine_name("pc", resident))
        assert pc["config"]["enable_chunked_prefill"]
        assert pc["config"]["max_num_batched_tokens"] == MAX_NUM_BATCHED_TOKENS
        assert pc["config"]["block_size"] == 32
        assert pc["config"]["enable_prefix_caching"]
        first, second = pc["scenarios"]["prefix"]
        assert second["metrics"]["vllm:prefix_cache_hits"] > 0, (resident, second["metrics"])

        nopc = engine_ok(results, engine_name("nopc", resident))
        assert not nopc["config"]["enable_prefix_caching"]
        for rnd in nopc["scenarios"]["prefix"]:
            assert rnd["metrics"]["vllm:prefix_cache_hits"] == 0, (resident, rnd["metrics"])

        pre = engine_ok(results, engine_name("preempt", resident))
        assert pre["config"]["num_gpu_blocks"] == PREEMPT_BLOCKS
        (rnd,) = pre["scenarios"]["preempt"]
        assert rnd["metrics"]["vllm:num_preemptions"] > 0, (resident, rnd["metrics"])
