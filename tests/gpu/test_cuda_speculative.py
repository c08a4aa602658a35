"""Prompt-lookup speculative decoding (ngram) with HEADINFER against FLASH_ATTN
with the same speculative config, compiled with CUDA graphs (skipped without
a GPU and CUDA vLLM). Prompts repeat a pattern so that drafts are proposed
and accepted; uniform verify batches read offloaded heads in place (uva)
inside full CUDA graphs, as FLASH_ATTN's run in its graphs. Prefill chunks
and mixed batches run between piecewise graphs; where vLLM batches a verify
step with a prefill chunk the two backends may split KV differently, so
near-ties of the reference may flip (``engine_compare.compare``). Then the
same with model-based drafters: an EAGLE head and a model's own MTP layer
(dummy weights), and ngram on Ray workers at TP = 2."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from engine_compare import (  # noqa: E402
    SMALL_KV_HEADS,
    compare,
    needs_gpus,
    needs_ray,
    run_engine,
    small_model,  # noqa: F401 - fixture
    spec,
)

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}


@pytest.mark.parametrize("resident", [0, 2])
def test_ngram_matches_flash_attn(small_model, resident):
    common = dict(dummy=False, eager=False, speculative=NGRAM, periodic=True)
    ref = run_engine(spec(small_model, "FLASH_ATTN", None, **common))
    got = run_engine(spec(small_model, "HEADINFER", resident, **common))
    print(f"ngram R={resident}: {compare(ref, got, near_ties=True)}")


@needs_gpus(2)
@needs_ray
def test_ngram_with_ray_workers(small_model):
    """ngram on Ray-launched workers at TP = 2 (two KV heads per rank, all
    offloaded) against FLASH_ATTN's mp workers with the same config."""
    common = dict(dummy=False, eager=False, speculative=NGRAM, periodic=True, tp=2)
    ref = run_engine(spec(small_model, "FLASH_ATTN", None, executor="mp", **common))
    got = run_engine(spec(small_model, "HEADINFER", 0, executor="ray", **common))
    print(f"ngram TP=2 ray R=0: {compare(ref, got, near_ties=True)}")


@pytest.fixture(scope="module")
def eagle_head(tmp_path_factory):
    """A one-layer checkpoint of the small model's shape; vLLM builds an EAGLE
    head from it (dummy weights: every draft is rejected)."""
    from vllm_headinfer.tiny_model import build_tiny_model

    return str(build_tiny_model(
        tmp_path_factory.mktemp("eagle") / "llama", "llama", num_layers=1, num_heads=8,
        num_kv_heads=SMALL_KV_HEADS, head_dim=128, vocab_size=2048, dtype="bfloat16", seed=3,
    ))


@pytest.mark.parametrize("resident", [0, 2])
def test_eagle_matches_flash_attn(small_model, eagle_head, resident):
    eagle = {"method": "eagle", "model": eagle_head, "num_speculative_tokens": 2}
    common = dict(dummy=True, eager=False, speculative=eagle)
    ref = run_engine(spec(small_model, "FLASH_ATTN", None, **common))
    got = run_engine(spec(small_model, "HEADINFER", resident, **common))
    print(f"eagle R={resident}: {compare(ref, got, near_ties=True)}")


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    """The small model's shape as MiMo (a Qwen2 with one multi-token-
    prediction layer, which vLLM's ``mtp`` drafts with); dummy weights."""
    import json
    from pathlib import Path

    from vllm_headinfer.tiny_model import build_tiny_model

    path = Path(build_tiny_model(
        tmp_path_factory.mktemp("mtp") / "qwen2", "qwen2", num_layers=4, num_heads=8,
        num_kv_heads=SMALL_KV_HEADS, head_dim=128, vocab_size=2048, dtype="bfloat16",
    ))
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("resident", [0, 2])
def test_mtp_matches_flash_attn(mtp_model, resident):
    common = dict(dummy=True, eager=False, speculative={"method": "mtp", "num_speculative_tokens": 2})
    ref = run_engine(spec(mtp_model, "FLASH_ATTN", None, **common))
    got = run_engine(spec(mtp_model, "HEADINFER", resident, **common))
    print(f"mtp R={resident}: {compare(ref, got, near_ties=True)}")
