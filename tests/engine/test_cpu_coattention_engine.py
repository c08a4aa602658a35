"""CPU co-attention end to end on the CPU platform: with an explicit
``cpu_attention`` the last offloaded KV heads of every layer are attended by
the co-attention kernel in decode steps, the other offloaded heads and the
resident ones as before.

HEADINFER with cpu_attention 1 and H_off (every offloaded head on the kernel)
at R = 0 (one of the two heads, then both; the second set through its
environment variable), at R = 1 with a count above H_off (capped at the
one offloaded head), and with split heads (1.5 at R = 0: one head whole and
the later half of each request's blocks of the other, merged with the torch
path's part; 0.25 at R = 1), against the default backend on the mixed batch of
test_equivalence under chunked prefill: identical greedy tokens, logprobs
within 1e-3. That the kernel served decode steps is asserted from its call
counts, and auto leaves it off on CPU. Verify steps of
speculative decoding with co-attention are in test_speculative.
"""

from __future__ import annotations

import re

import pytest
from conftest import BASE_LLM, assert_same_outputs, engine_ok, expand_counts, headinfer_llm, run_engines
from test_equivalence import ENGINE_SETTINGS, SCENARIOS_OF, make_scenarios

H = 2  # KV heads of the llama-gqa model
LLM = {**BASE_LLM, **ENGINE_SETTINGS["pc"]}
# name -> (resident heads, cpu_attention setting, env, CPU heads per layer)
ENGINES = {
    "R0-cpu1": (0, 1, {}, 1),
    "R0-cpu2-env": (0, None, {"VLLM_HEADINFER_CPU_ATTENTION": "2"}, 2),
    "R1-cpu8": (1, 8, {}, 1),
    "R0-cpu1.5": (0, 1.5, {}, 1.5),
    "R1-cpu0.25": (1, 0.25, {}, 0.25),
    "R0-auto": (0, "auto", {}, 0),
}


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    """One runner process per co-attention engine: vLLM 0.32's CPU platform
    cannot start an engine in a process that has loaded numba (see
    vllm_headinfer/coattention/__init__.py), so each is the last engine of its process."""
    engine = lambda name, llm, env=None: {  # noqa: E731
        "name": name, "model": "m", "llm": llm, "env": env or {}, "scenarios": ["mixed"]}
    # The default backend runs what test_equivalence's does on this model and
    # setting (mixed first), so the session runs that engine once for both.
    runs = [[{**engine("default", LLM), "scenarios": SCENARIOS_OF["pc"]}]]
    for name, (resident, cpu, env, _) in ENGINES.items():
        settings = {"cpu_kv_gib": 0.05} if cpu is None else {"cpu_kv_gib": 0.05, "cpu_attention": cpu}
        hi = engine(name, {**LLM, **headinfer_llm(resident, **settings)}, env)
        if ENGINES[name][3]:
            runs.append([hi])
        else:
            runs[0].append(hi)
    work = tmp_path_factory.mktemp("coattention")
    merged: dict = {"engines": {}}
    for i, engines in enumerate(runs):
        spec = {"inprocess": True, "paths": {"m": tiny_models("llama-gqa")},
                "scenarios": make_scenarios(), "engines": engines}
        out, _ = run_engines(spec, work, f"coattention-{i}", timeout=600)
        merged["engines"].update(out["engines"])
    return merged


def coattention_counts(log: list[str]) -> list[float] | None:
    """CPU heads per layer from the startup line; None without one."""
    lines = [ln for ln in log if "HEADINFER CPU co-attention" in ln]
    if not lines:
        return None
    m = re.search(r"attend ([\d.]+)/(\d+) offloaded KV head-layers per rank \(([^)]*)\)", lines[-1])
    assert m, lines[-1]
    return expand_counts(m[3])


@pytest.mark.parametrize("name", list(ENGINES))
def test_same_tokens_and_logprobs(results, name):
    base = engine_ok(results, "default")
    hi = engine_ok(results, name)
    assert hi["config"]["backend"] == "HEADINFER"
    assert_same_outputs(base["scenarios"]["mixed"][0]["outputs"], hi["scenarios"]["mixed"][0]["outputs"],
                        f"{name} vs default")


@pytest.mark.parametrize("name", list(ENGINES))
def test_the_kernel_serves_the_heads_set(results, name):
    resident, _, _, cpu_heads = ENGINES[name]
    hi = engine_ok(results, name)
    calls = hi["coattention_calls"]
    if cpu_heads == 0:
        assert coattention_counts(hi["headinfer_log"]) is None
        assert calls == {} or not any(calls.values()), calls
        return
    assert coattention_counts(hi["headinfer_log"]) == [cpu_heads, cpu_heads]
    # Every layer of every pure decode step: the six requests decode 8 to
    # 24 tokens, so well over one step's two layers.
    assert calls.get("decode", 0) > 2 * 8, calls
    assert calls.get("verify", 0) == 0, calls
