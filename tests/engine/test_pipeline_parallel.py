"""Pipeline parallelism on the CPU platform, as far as vLLM 0.32's CPU build
runs it: PP = 2 over a 2-layer Llama with 4 KV heads, HEADINFER with the
per-layer list [3, 1] against the default backend at PP = 2.

* Each stage places its own layer, found by name (stage 0 keeps 3 heads of
  layer 0 resident, stage 1 one head of layer 1), both pools have the
  engine's one block count (the smaller stage's), and each stage allocates a
  host pool for its own offloaded heads only.
* Outputs: identical to the default backend's. vLLM 0.32's CPU build fails
  pipeline-parallel generation with every backend (``assert
  self.intermediate_tensors is not None`` in a worker); while it does,
  HEADINFER must fail exactly as the default backend does, no differently.
  Exactness at PP = 2 is checked on GPUs (tests/gpu).
"""

from __future__ import annotations

import random
import re

import pytest
from conftest import (
    BASE_LLM,
    assert_same_outputs,
    cpu_thread_binding,
    engine_log,
    engine_ok,
    headinfer_llm,
    placement_of,
    random_tokens,
    run_engines,
)

PP = 2
LLM = {
    **BASE_LLM,
    "pipeline_parallel_size": PP,
    "max_model_len": 1024,
    "kv_cache_memory_bytes": 64 << 20,
    "max_num_batched_tokens": 64,
    "gpu_memory_utilization": 0.2,
}
COUNTS = [3, 1]


@pytest.fixture(scope="module")
def pp_run(tiny_models, tmp_path_factory):
    rng = random.Random(11)
    requests = [{"prompt_token_ids": random_tokens(rng, n), "max_tokens": m}
                for n, m in [(5, 8), (90, 6), (300, 4)]]
    binding = {"VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(PP)}
    spec = {
        "inprocess": False,
        "paths": {"llama-mha": tiny_models("llama-mha")},
        "scenarios": {"mixed": {"rounds": [requests]}},
        "engines": [
            {"name": "default", "model": "llama-mha", "llm": LLM, "env": binding,
             "scenarios": ["mixed"]},
            {"name": "headinfer", "model": "llama-mha", "scenarios": ["mixed"], "env": binding,
             "llm": {**LLM, **headinfer_llm(COUNTS, cpu_kv_gib=0.05)}},
        ],
    }
    return run_engines(spec, tmp_path_factory.mktemp("pp"), "pp", timeout=900)


def test_each_stage_places_and_pools_its_own_layers(pp_run):
    results, output = pp_run
    assert results["engines"]["headinfer"]["error"] is None, results["engines"]["headinfer"]["error"]
    lines = [ln for ln in output.splitlines() if "HEADINFER placement:" in ln]
    assert len(lines) == PP, "\n".join(lines)
    stages = [placement_of([ln]) for ln in lines]
    assert all(s["layers"] == 1 for s in stages), lines
    # Each stage's line names its own layer (by index in the model).
    assert sorted(re.search(r"\d+ in layer \d+", ln)[0] for ln in lines) == [
        "1 in layer 1", "3 in layer 0"], lines
    assert len({s["blocks"] for s in stages}) == 1, "stages hold different block counts"
    pools = re.findall(r"Worker_PP(\d).*HEADINFER host pool: allocating [\d.]+ GiB for (\d+) layers",
                       output)
    assert sorted(pools) == [("0", "1"), ("1", "1")], pools


def _worker_errors(output: str, engine: str) -> set[str]:
    """The distinct error lines the workers of ``engine`` logged (traceback
    text without process ids and times; a failure may be logged more than
    once)."""
    pattern = re.compile(r"^\(Worker\S* pid=\d+\) ERROR [\d-]+ [\d:]+ \[[^]]*\] (.*)$")
    return {m[1] for m in map(pattern.match, engine_log(output, engine)) if m}


def test_outputs_match_the_default_backend(pp_run):
    results, output = pp_run
    default, ours = results["engines"]["default"], results["engines"]["headinfer"]
    for res in (default, ours):
        assert res["error"] is None, res["error"]
    if default.get("scenario_error"):
        # vLLM's own failure: HEADINFER must fail in the same place.
        assert ours.get("scenario_error") is not None, "HEADINFER generated where vLLM fails"
        expected = _worker_errors(output, "default")
        assert expected, "the default backend failed without a worker error"
        assert _worker_errors(output, "headinfer") == expected, "HEADINFER failed differently"
        return
    engine_ok(results, "headinfer")
    assert_same_outputs(default["scenarios"]["mixed"][0]["outputs"],
                        ours["scenarios"]["mixed"][0]["outputs"], "PP=2 mixed batch")
