"""Every setting HEADINFER refuses is refused at startup, naming the setting.

All cases run in one runner process in vLLM's default (multi-process) mode:
an error raised while ``LLM(...)`` builds its config in the user's process
comes back as the plugin's ``HeadInferConfigError``, whereas anything that only
failed inside the spawned engine core would surface as vLLM's generic
``RuntimeError("Engine core initialization failed ...")``. So the type check
below also proves the refusal happened in the main process, before any engine
process started.
"""

from __future__ import annotations

import glob
import shutil

import pytest
from conftest import BASE_LLM, headinfer_llm, run_engines

LLM = {**BASE_LLM, "max_model_len": 1024, "kv_cache_memory_bytes": 64 << 20}
H = 2  # KV heads of the "gqa" model below
RIA = "VLLM_HEADINFER_RESIDENT_KV_HEADS"
GIB = "VLLM_HEADINFER_CPU_KV_GIB"

# name -> (model, LLM kwargs, env, strings the message must contain)
CASES = {
    "unknown-key": ("gqa", headinfer_llm(bogus_setting=1), {}, ["bogus_setting", "additional_config.headinfer"]),
    "not-a-dict": ("gqa", {"attention_backend": "HEADINFER", "additional_config": {"headinfer": "R=1"}}, {}, ["additional_config.headinfer"]),
    "resident-above-H": ("gqa", headinfer_llm(H + 1), {}, ["resident_kv_heads", f"0..{H}"]),
    "resident-negative": ("gqa", headinfer_llm(-1), {}, ["resident_kv_heads"]),
    "resident-fraction": ("gqa", headinfer_llm(1.5), {}, ["resident_kv_heads"]),
    "resident-string": ("gqa", headinfer_llm("two"), {}, ["resident_kv_heads"]),
    "resident-bool": ("gqa", headinfer_llm(True), {}, ["resident_kv_heads"]),
    "resident-number-as-string": ("gqa", headinfer_llm("2"), {}, ["resident_kv_heads", "'2'"]),
    "resident-list-wrong-length": ("gqa", headinfer_llm([1]), {}, ["resident_kv_heads", "a list of 2 integers", "got 1"]),
    "resident-list-above-H": ("gqa", headinfer_llm([1, H + 1]), {}, ["resident_kv_heads", f"0..{H}"]),
    "resident-list-negative": ("gqa", headinfer_llm([1, -1]), {}, ["resident_kv_heads"]),
    "resident-list-empty": ("gqa", headinfer_llm([]), {}, ["resident_kv_heads"]),
    "pool-zero": ("gqa", headinfer_llm(kv_pool_tokens=0), {}, ["kv_pool_tokens", "'max'"]),
    "pool-word": ("gqa", headinfer_llm(kv_pool_tokens="lots"), {}, ["kv_pool_tokens", "'max'"]),
    "pool-fraction": ("gqa", headinfer_llm(kv_pool_tokens=10.5), {}, ["kv_pool_tokens"]),
    "pool-beyond-budgets": ("gqa", headinfer_llm(kv_pool_tokens=10**7, cpu_kv_gib=0.01), {}, ["kv_pool_tokens", "cpu_kv_gib", "at most"]),
    "max-model-len-beyond-budgets": ("gqa", {**headinfer_llm(cpu_kv_gib=0.005), "max_model_len": 8192, "kv_cache_memory_bytes": 1 << 20}, {}, ["kv_pool_tokens", "max_model_len=8192"]),
    "env-pool-negative": ("gqa", headinfer_llm(), {"VLLM_HEADINFER_KV_POOL_TOKENS": "-3"}, ["kv_pool_tokens", "VLLM_HEADINFER_KV_POOL_TOKENS"]),
    "cpu-kv-gib-zero": ("gqa", headinfer_llm(cpu_kv_gib=0), {}, ["cpu_kv_gib"]),
    "cpu-kv-gib-negative": ("gqa", headinfer_llm(cpu_kv_gib=-2.5), {}, ["cpu_kv_gib"]),
    "cpu-kv-gib-string": ("gqa", headinfer_llm(cpu_kv_gib="lots"), {}, ["cpu_kv_gib"]),
    "cpu-kv-gib-inf": ("gqa", headinfer_llm(cpu_kv_gib="inf"), {}, ["cpu_kv_gib"]),
    "cpu-kv-gib-nan": ("gqa", headinfer_llm(cpu_kv_gib="nan"), {}, ["cpu_kv_gib"]),
    "cpu-kv-gib-above-free-ram": ("gqa", headinfer_llm(cpu_kv_gib=1e6), {}, ["cpu_kv_gib", "free"]),
    "decode-path": ("gqa", headinfer_llm(decode_path="fast"), {}, ["decode_path", "uva", "staged"]),
    "prefill-path": ("gqa", headinfer_llm(prefill_path="gpu"), {}, ["prefill_path", "uva", "staged"]),
    "staging-mib-small": ("gqa", headinfer_llm(staging_mib=8), {}, ["staging_mib", "16"]),
    "staging-mib-string": ("gqa", headinfer_llm(staging_mib="big"), {}, ["staging_mib"]),
    "cpu-attention-negative": ("gqa", headinfer_llm(cpu_attention=-1), {}, ["cpu_attention", "'auto', 'off' or a number of KV heads"]),
    "cpu-attention-threads-zero": ("gqa", headinfer_llm(cpu_attention_threads=0), {}, ["cpu_attention_threads", ">= 1"]),
    "env-cpu-attention": ("gqa", headinfer_llm(), {"VLLM_HEADINFER_CPU_ATTENTION": "all"}, ["cpu_attention", "VLLM_HEADINFER_CPU_ATTENTION"]),
    "settings-without-backend": ("gqa", {"additional_config": {"headinfer": {"resident_kv_heads": 1}}}, {}, ["additional_config.headinfer", "HEADINFER"]),
    "kv-cache-dtype-fp8-inc": ("gqa", {**headinfer_llm(), "kv_cache_dtype": "fp8_inc"}, {}, ["kv-cache-dtype", "fp8_inc", "fp8_e4m3"]),
    "kv-connector": ("gqa", {**headinfer_llm(), "kv_transfer_config": {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}}, {}, ["kv-transfer-config"]),
    "kv-offloading-size": ("gqa", {**headinfer_llm(), "kv_offloading_size": 1.0}, {}, ["kv-offloading-size"]),
    "env-resident-not-int": ("gqa", headinfer_llm(), {RIA: "abc"}, ["resident_kv_heads", RIA]),
    "env-resident-above-H": ("gqa", headinfer_llm(), {RIA: str(H + 5)}, ["resident_kv_heads", RIA]),
    "env-resident-negative": ("gqa", {"attention_backend": "HEADINFER"}, {RIA: "-1"}, ["resident_kv_heads", RIA]),
    "env-cpu-kv-gib": ("gqa", headinfer_llm(), {GIB: "-5"}, ["cpu_kv_gib", GIB]),
    "env-decode-path": ("gqa", headinfer_llm(), {"VLLM_HEADINFER_DECODE_PATH": "x"}, ["decode_path"]),
    "sliding-window-model": ("sliding", headinfer_llm(), {}, ["sliding-window", "backend_per_kind"]),
    "mla-model": ("mla", headinfer_llm(), {}, ["MLA"]),
}


def _mla_config_dir(path, tokenizer_from: str) -> str:
    """A DeepSeek-V2 (MLA) config with a tokenizer and no weights: the refusal
    happens while the config is built, before any weight is loaded."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    transformers.DeepseekV2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=2, max_position_embeddings=4096,
    ).save_pretrained(path)
    for f in glob.glob(f"{tokenizer_from}/*token*") + glob.glob(f"{tokenizer_from}/special*"):
        shutil.copy(f, path)
    return str(path)


def _with_paths(kwargs: dict, paths: dict) -> dict:
    """``"MODEL:key"`` in a speculative config stands for that model's path."""
    spec = kwargs.get("speculative_config")
    if spec and str(spec.get("model", "")).startswith("MODEL:"):
        return {**kwargs, "speculative_config": {**spec, "model": paths[spec["model"][6:]]}}
    return kwargs


@pytest.fixture(scope="module")
def refusals(tiny_models, model_dir, tmp_path_factory):
    from vllm_headinfer.tiny_model import build_tiny_model

    gqa = tiny_models("llama-gqa")
    paths = {
        "gqa": gqa,
        "sliding": str(
            build_tiny_model(
                model_dir / "qwen2-sliding",
                "qwen2",
                num_kv_heads=2,
                extra_config={"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0},
            )
        ),
        "mla": _mla_config_dir(model_dir / "deepseek-v2-mla-config", gqa),
    }
    engines = [
        {"name": name, "model": model, "llm": {**LLM, **_with_paths(kwargs, paths)}, "env": env}
        for name, (model, kwargs, env, _) in CASES.items()
    ]
    spec = {"inprocess": False, "paths": paths, "scenarios": {}, "engines": engines}
    results, _ = run_engines(spec, tmp_path_factory.mktemp("refusals"), "refusals", timeout=600)
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_refused_at_startup_naming_the_setting(refusals, case):
    res = refusals["engines"][case]
    assert res["error"] is not None, f"{case}: LLM(...) started instead of refusing"
    err = res["error"]
    assert err["type"] == "HeadInferConfigError", (
        f"{case}: expected HEADINFER's own startup error from the main process, got "
        f"{err['type']}: {err['message']}"
    )
    for needle in CASES[case][3]:
        assert needle in err["message"], f"{case}: {needle!r} not in: {err['message']}"



def test_unverified_speculation_is_refused_naming_the_setting():
    """A proposer whose layers are not verified with head placement (Medusa
    heads here) is refused at startup, naming the setting and the methods
    accepted."""
    from types import SimpleNamespace

    from vllm_headinfer.config import HeadInferConfigError
    from vllm_headinfer.startup import _check_speculative

    with pytest.raises(HeadInferConfigError, match=r"--speculative-config method 'medusa'.*eagle3, mtp"):
        _check_speculative(SimpleNamespace(method="medusa"))
    _check_speculative(SimpleNamespace(method="eagle3"))
