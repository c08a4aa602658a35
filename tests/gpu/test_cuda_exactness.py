"""HEADINFER against FLASH_ATTN on CUDA (skipped without a GPU and CUDA vLLM).

Each engine runs in its own process (tests/gpu/engine_run.py) so GPU memory is
released between configurations. Both models are bf16:
* a small random Llama with real weights: greedy tokens must be identical;
* a Llama-3-8B-shaped model (4 of its 32 layers, dummy weights): sampled-token
  logprobs within bf16 tolerance.
Every run uses chunked prefill (max_num_batched_tokens=512 under prompts of up
to 3000 tokens) and one batch of mixed lengths, for R = 0, 1, H/2, H.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

RUNNER = Path(__file__).with_name("engine_run.py")
PROMPT_LENS = [7, 130, 700, 1500, 3000]
SMALL_KV_HEADS = 4
BF16_LOGPROB_TOL = 0.06


def run_engine(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, str(RUNNER), json.dumps(spec)],
        capture_output=True, text=True, timeout=900,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"engine failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from vllm_headinfer.tiny_model import build_tiny_model

    return str(build_tiny_model(
        tmp_path_factory.mktemp("small") / "llama", "llama", num_layers=4, num_heads=8,
        num_kv_heads=SMALL_KV_HEADS, head_dim=128, vocab_size=2048, dtype="bfloat16",
    ))


@pytest.fixture(scope="module")
def shaped_model(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from bench_headinfer import write_model

    return str(write_model(tmp_path_factory.mktemp("shaped"), layers=4))


def spec(model: str, backend: str, resident: int | None, dummy: bool, **extra) -> dict:
    return {"model": model, "backend": backend, "resident": resident, "dummy": dummy,
            "prompt_lens": PROMPT_LENS, "max_tokens": 24, **extra}


def compare(ref: dict, got: dict, exact_tokens: bool) -> None:
    assert len(ref["outputs"]) == len(got["outputs"]) == len(PROMPT_LENS)
    for r, g in zip(ref["outputs"], got["outputs"]):
        if exact_tokens:
            assert g["token_ids"] == r["token_ids"]
        # Compare logprobs where both runs took the same path.
        for tr, tg, lr, lg in zip(r["token_ids"], g["token_ids"], r["logprobs"], g["logprobs"]):
            if tr != tg:
                break
            assert abs(lr - lg) <= BF16_LOGPROB_TOL, (lr, lg)


@pytest.fixture(scope="module")
def small_reference(small_model):
    return run_engine(spec(small_model, "FLASH_ATTN", None, dummy=False))


@pytest.mark.parametrize("resident", [0, 1, SMALL_KV_HEADS // 2, SMALL_KV_HEADS])
def test_small_model_tokens_identical(small_model, small_reference, resident):
    got = run_engine(spec(small_model, "HEADINFER", resident, dummy=False))
    compare(small_reference, got, exact_tokens=True)


@pytest.mark.parametrize("path", ["uva", "staged"])
def test_both_offload_paths_exact(small_model, small_reference, path):
    got = run_engine(spec(small_model, "HEADINFER", 0, dummy=False,
                          headinfer={"decode_path": path, "prefill_path": path}))
    compare(small_reference, got, exact_tokens=True)


def test_8b_shape_logprobs(shaped_model):
    ref = run_engine(spec(shaped_model, "FLASH_ATTN", None, dummy=True))
    for resident in (0, 1, 4, 8):
        got = run_engine(spec(shaped_model, "HEADINFER", resident, dummy=True))
        compare(ref, got, exact_tokens=False)
