"""Tensor parallelism (mp executor) on the CPU platform: each rank splits its
own KV heads, and HEADINFER matches the default backend at the same TP size.

vLLM's CPU platform runs TP = 2 with two worker processes (Ray is refused on
CPU; the Ray runs are GPU-host tests in tests/gpu). Engines:

* Llama with 2 KV heads at TP = 2: one KV head per rank, R = 0 and R = 1;
* Llama with 4 KV heads at TP = 2: two per rank, R = 1 (a split inside a rank);
* the default backend for each model at TP = 2.

The capacity each rank logs must be its own host budget over its own
offloaded heads.

Each is compared on a mixed batch under chunked prefill (64 tokens a step)
and a prefix-cache round (prompt logprobs would bypass the prefix cache, so
sampled tokens' logprobs are compared). Two settings are refused
because of TP: a resident count above the per-rank heads, and a per-rank host
budget that fits one rank but not the two ranks of this node together.
"""

from __future__ import annotations

import random

import pytest
from conftest import (
    BASE_LLM,
    MODEL_SHAPES,
    assert_same_outputs,
    cpu_thread_binding,
    engine_log,
    engine_ok,
    headinfer_llm,
    placement_of,
    random_tokens,
    run_engines,
)

TP = 2
CPU_KV_GIB = 0.05
HEAD_DIM, FLOAT32_BYTES = 32, 4  # the tiny models' head size; BASE_LLM's dtype
LLM = {
    **BASE_LLM,
    "tensor_parallel_size": TP,
    "max_model_len": 1024,
    "kv_cache_memory_bytes": 64 << 20,
    "max_num_batched_tokens": 64,
    "enable_prefix_caching": True,
    # On CPU this is the share of RAM each worker checks is free at start.
    "gpu_memory_utilization": 0.2,
}
# engine name -> (model shape, resident KV heads per rank or None = default backend)
ENGINES = {
    "gqa-default": ("llama-gqa", None),
    "gqa-R0": ("llama-gqa", 0),
    "gqa-R1": ("llama-gqa", 1),
    "mha-default": ("llama-mha", None),
    "mha-R1": ("llama-mha", 1),
}


def _scenarios() -> dict:
    rng = random.Random(7)
    t = lambda n: random_tokens(rng, n)  # noqa: E731
    shared = t(200)
    mixed = [{"prompt_token_ids": t(n), "max_tokens": m} for n, m in [(5, 16), (90, 12), (300, 10)]]
    return {
        "mixed": {"rounds": [mixed]},
        "prefix": {"rounds": [
            [{"prompt_token_ids": shared + t(10), "max_tokens": 8}],
            [{"prompt_token_ids": shared + t(40), "max_tokens": 8}],
        ]},
    }


def _refusal_budget() -> float:
    """A cpu_kv_gib one rank may pin but two ranks on this node may not."""
    from vllm_headinfer.host_memory import available_host_bytes, host_limit_per_rank

    free = available_host_bytes()
    one, two = host_limit_per_rank(free, 1), host_limit_per_rank(free, TP)
    return round((one + two) / 2 / (1 << 30), 2)


@pytest.fixture(scope="module")
def tp_run(tiny_models, tmp_path_factory):
    binding = {"VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(TP)}
    engines = []
    for name, (shape, resident) in ENGINES.items():
        llm = dict(LLM)
        if resident is not None:
            llm.update(headinfer_llm(resident, cpu_kv_gib=CPU_KV_GIB))
        engines.append({"name": name, "model": shape, "llm": llm, "env": binding,
                        "scenarios": ["mixed", "prefix"]})
    refusals = {
        "refuse-resident": headinfer_llm(3, cpu_kv_gib=CPU_KV_GIB),
        "refuse-node-ram": headinfer_llm(0, cpu_kv_gib=_refusal_budget()),
    }
    engines += [{"name": name, "model": "llama-mha", "llm": {**LLM, **kw}, "env": binding}
                for name, kw in refusals.items()]
    spec = {
        # The engine core in the runner; the two workers in processes of
        # their own (vLLM's mp executor).
        "inprocess": True,
        "paths": {key: tiny_models(key) for key in ("llama-gqa", "llama-mha")},
        "scenarios": _scenarios(),
        "engines": engines,
    }
    return run_engines(spec, tmp_path_factory.mktemp("tp"), "tp", timeout=1200)


@pytest.mark.parametrize("name", [n for n, (_, r) in ENGINES.items() if r is not None])
def test_same_outputs_as_default_backend_at_tp2(tp_run, name):
    results, output = tp_run
    shape, resident = ENGINES[name]
    reference = engine_ok(results, f"{shape.split('-')[1]}-default")["scenarios"]
    got = engine_ok(results, name)
    heads_per_rank = MODEL_SHAPES[shape]["num_kv_heads"] // TP
    placement = placement_of(engine_log(output, name))
    assert (placement["resident"], placement["heads"]) == (resident, heads_per_rank), placement
    if resident < heads_per_rank:
        # Each rank's cpu_kv_gib holds only that rank's offloaded heads, so T
        # ranks with B GiB each hold what one rank would with T * B GiB.
        host_block = (placement["layers"] * (heads_per_rank - resident) * LLM["block_size"]
                      * 2 * HEAD_DIM * FLOAT32_BYTES)
        assert placement["limited_by"].startswith("host"), placement
        assert placement["blocks"] == int(CPU_KV_GIB * (1 << 30)) // host_block, placement
    assert got["config"]["additional_config"]["headinfer"]["resident_kv_heads"] == resident
    for scenario, rounds in got["scenarios"].items():
        for i, (want, have) in enumerate(zip(reference[scenario], rounds)):
            assert_same_outputs(want["outputs"], have["outputs"], f"{name} {scenario} round {i}")
    hits = got["scenarios"]["prefix"][1]["metrics"]["vllm:prefix_cache_hits"]
    assert hits >= 192, f"{name}: the prefix round hit {hits} cached tokens"


def test_resident_count_is_per_rank(tp_run):
    err = tp_run[0]["engines"]["refuse-resident"]["error"]
    assert err is not None and err["type"] == "HeadInferConfigError", err
    assert "resident_kv_heads" in err["message"] and "0..2" in err["message"], err["message"]
    assert "per tensor-parallel rank" in err["message"], err["message"]


def test_node_ram_refused_for_all_ranks_together(tp_run):
    err = tp_run[0]["engines"]["refuse-node-ram"]["error"]
    assert err is not None and err["type"] == "HeadInferConfigError", err
    assert "cpu_kv_gib" in err["message"] and f"{TP} rank(s)" in err["message"], err["message"]
