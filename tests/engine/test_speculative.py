"""Speculative decoding (prompt lookup, ``ngram``) with HEADINFER.

HEADINFER + ngram is compared with the default backend + ngram, with the
default backend without speculation and with HEADINFER without it, for R = 0, 1, H and auto (with a device
budget that leaves layers different counts), under chunked prefill and a
batch of mixed lengths: identical greedy tokens, logprobs within 1e-3. The
prompts repeat short patterns, so prompt lookup proposes drafts and some are
accepted (asserted): verify steps with several query tokens per request run
over offloaded heads, and rejected drafts leave slots that later steps
overwrite.

With CPU co-attention of one of R = 0's two offloaded heads, verify steps
run through the CPU kernel (asserted from its call counts) with the same
outputs.

A draft model (a one-layer random Llama with the same tokenizer) likewise,
for R = 0 and auto: its own layers keep every head on the device and do not
enter the placement. An EAGLE head (vLLM builds it from the same one-layer
checkpoint) likewise, with dummy weights for target and drafter: its drafts
are all rejected, so every verify step leaves rejected slots behind. And
``mtp``: the tiny Qwen2 as MiMo, whose own multi-token-prediction layer
drafts (dummy weights likewise).

vLLM 0.32 cannot start a second ngram engine in one process (its proposer's
compiled kernels fail to load again), so each speculative engine runs in its
own runner process.
"""

from __future__ import annotations

import random
from pathlib import Path

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

H = 2  # KV heads of the llama-gqa model
LLM = {
    **BASE_LLM,
    "max_model_len": 1024,
    "max_num_batched_tokens": 64,
    "kv_cache_memory_bytes": 64 << 20,
}
NGRAM = {
    "speculative_config": {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_max": 4,
        "prompt_lookup_min": 2,
    }
}
# llama-gqa: 2 layers x 2 KV heads, 8 KiB per head-layer and 32-token block;
# 33 blocks hold the 1024-token pool. Room for 3 of the 4 head-layers.
AUTO_BUDGET = 33 * 3 * 8192 + 4096
HEADINFER = {
    "R0": headinfer_llm(0, cpu_kv_gib=0.05),
    "R1": headinfer_llm(1, cpu_kv_gib=0.05),
    f"R{H}": headinfer_llm(H, cpu_kv_gib=0.05),
    "auto": {**headinfer_llm(cpu_kv_gib=0.05), "kv_cache_memory_bytes": AUTO_BUDGET},
}
# CPU co-attention of one and a half of R = 0's two offloaded heads: verify
# steps of several query tokens per request through the CPU kernel, and a
# split head whose GPU part ends before each request's first query.
COATTENTION = headinfer_llm(0, cpu_kv_gib=0.05, cpu_attention=1.5)


def scenario() -> dict:
    rng = random.Random(5)
    pattern = lambda n, period: (random_tokens(rng, period) * (n // period + 1))[:n]  # noqa: E731
    batch = [
        {"prompt_token_ids": pattern(300, 7), "max_tokens": 48},  # several prefill chunks
        {"prompt_token_ids": pattern(40, 5), "max_tokens": 40},
        {"prompt_token_ids": random_tokens(rng, 90), "max_tokens": 32},
        {"prompt_token_ids": pattern(12, 3), "max_tokens": 24},
    ]
    return {"s": {"rounds": [batch]}}


@pytest.fixture(scope="module")
def draft_path(model_dir):
    from vllm_headinfer.tiny_model import build_tiny_model

    return str(build_tiny_model(model_dir / "llama-gqa-draft", "llama", num_layers=1,
                                num_heads=4, num_kv_heads=2, seed=3))


@pytest.fixture(scope="module")
def mtp_path(tiny_models, model_dir):
    """A model with a multi-token-prediction layer: the tiny Qwen2 as MiMo
    (a Qwen2 with MTP layers; vLLM builds the MTP drafter from the target's
    config), loaded with dummy weights."""
    import json
    import shutil

    source, path = Path(tiny_models("qwen2-gqa")), model_dir / "qwen2-gqa-mtp"
    if not path.exists():
        shutil.copytree(source, path, ignore=shutil.ignore_patterns("*.safetensors"))
        config = json.loads((path / "config.json").read_text())
        config.update(architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1)
        (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def results(tiny_models, draft_path, mtp_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("speculative")
    paths = {"m": tiny_models("llama-gqa"), "mtp": mtp_path}
    engine = lambda name, llm: {"name": name, "model": "m", "llm": llm, "scenarios": ["s"]}  # noqa: E731
    runs = [[
        engine("default", LLM),
        engine("R0", {**LLM, **HEADINFER["R0"]}),
        engine("default-ngram", {**LLM, **NGRAM}),
    ]]
    runs += [[engine(f"{name}-ngram", {**LLM, **NGRAM, **hi})] for name, hi in HEADINFER.items()]
    runs += [[engine("R0-cpu1.5-ngram", {**LLM, **NGRAM, **COATTENTION})]]

    def drafted(tag: str, extra: dict, model: str = "m") -> list[dict]:
        """One drafter's engines (``extra``: its speculative config and, for
        dummy weights, the load format): the default backend with it and,
        where weights are dummy, without it; HEADINFER R0 and auto with it.
        The drafter's layer (2 heads, all resident) takes its own pages from
        the device budget."""
        run = lambda name, llm: {**engine(name, llm), "model": model}  # noqa: E731
        plain = [run(f"default-{tag}-plain", {**LLM, "load_format": extra["load_format"]})
                 ] if "load_format" in extra else []
        return [*plain,
                run(f"default-{tag}", {**LLM, **extra}),
                run(f"R0-{tag}", {**LLM, **extra, **HEADINFER["R0"]}),
                run(f"auto-{tag}", {**LLM, **extra, **HEADINFER["auto"],
                                    "kv_cache_memory_bytes": AUTO_BUDGET + 33 * 2 * 8192})]

    runs.append(drafted("draft", {"speculative_config": {
        "method": "draft_model", "model": draft_path, "num_speculative_tokens": 3}}))
    runs.append(drafted("eagle", {"speculative_config": {
        "method": "eagle", "model": draft_path, "num_speculative_tokens": 2},
        "load_format": "dummy"}))
    # MTP: the drafter is the target checkpoint's own MTP layer; dummy
    # weights, so its drafts are rejected.
    runs.append(drafted("mtp", {"speculative_config": {"method": "mtp", "num_speculative_tokens": 2},
                                "load_format": "dummy"}, model="mtp"))
    merged: dict = {"engines": {}}
    for i, engines in enumerate(runs):
        spec = {"inprocess": True, "paths": paths, "scenarios": scenario(), "engines": engines}
        out, _ = run_engines(spec, work, f"speculative-{i}", timeout=600)
        merged["engines"].update(out["engines"])
    return merged


def _outputs(results, name):
    return engine_ok(results, name)["scenarios"]["s"][0]


def test_the_scenario_accepts_drafts(results):
    metrics = _outputs(results, "default-ngram")["metrics"]
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0, metrics
    assert_same_outputs(
        _outputs(results, "default")["outputs"], _outputs(results, "default-ngram")["outputs"],
        "default backend with and without ngram",
    )


@pytest.mark.parametrize("name", list(HEADINFER))
def test_headinfer_with_ngram_matches(results, name):
    hi = _outputs(results, f"{name}-ngram")
    assert hi["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0, hi["metrics"]
    for reference in ("default-ngram", "default", "R0"):
        assert_same_outputs(
            _outputs(results, reference)["outputs"], hi["outputs"], f"{name}+ngram vs {reference}"
        )
    p = placement_of(engine_ok(results, f"{name}-ngram")["headinfer_log"])
    if name == "auto":
        assert p["counts"] == [2, 1], p
    else:
        assert p["resident"] == int(name[1:])


def test_cpu_coattention_in_verify_steps(results):
    hi = _outputs(results, "R0-cpu1.5-ngram")
    assert hi["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0, hi["metrics"]
    for reference in ("default-ngram", "default"):
        assert_same_outputs(
            _outputs(results, reference)["outputs"], hi["outputs"], f"R0+cpu1.5+ngram vs {reference}"
        )
    calls = engine_ok(results, "R0-cpu1.5-ngram")["coattention_calls"]
    assert calls.get("verify", 0) > 0 and calls.get("decode", 0) > 0, calls


# Drafter -> references: the default backend with that drafter, and without
# speculation (dummy weights for EAGLE's engines).
DRAFTERS = {"draft": ("default-draft", "default"), "eagle": ("default-eagle", "default-eagle-plain"),
            "mtp": ("default-mtp", "default-mtp-plain")}


@pytest.mark.parametrize("name", ["R0", "auto"])
@pytest.mark.parametrize("drafter", list(DRAFTERS))
def test_headinfer_with_a_drafter_matches(results, drafter, name):
    hi = _outputs(results, f"{name}-{drafter}")
    assert hi["metrics"]["vllm:spec_decode_num_draft_tokens"] > 0, hi["metrics"]
    for reference in DRAFTERS[drafter]:
        assert_same_outputs(
            _outputs(results, reference)["outputs"], hi["outputs"], f"{name}+{drafter} vs {reference}"
        )
    p = placement_of(engine_ok(results, f"{name}-{drafter}")["headinfer_log"])
    # The target's two layers are placed; the drafter's layer is not.
    assert p["layers"] == 2
    assert p["counts"] == ([0, 0] if name == "R0" else [2, 1]), p
