"""Shared by the GPU tests: engines in their own processes, the two test
models, and the comparison of greedy outputs under bf16 rounding.

Each engine runs in its own process (engine_run.py) so GPU memory is released
between configurations. Both models are bf16:
* a small random Llama with real weights (SMALL_KV_HEADS KV heads);
* a Llama-3-8B-shaped model (4 of its 32 layers, dummy weights).
Every run uses chunked prefill (max_num_batched_tokens=512 under prompts of up
to 3000 tokens) and one batch of mixed lengths.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("engine_run.py")
PROMPT_LENS = [7, 130, 700, 1500, 3000]
SMALL_KV_HEADS = 4
# Logits are bf16: one unit in the last place is 2**-7 of their magnitude
# (0.0625 for a logit of 8-16), so the tolerance grows with the logprob.
BF16_LOGPROB_ATOL, BF16_LOGPROB_RTOL = 0.1, 0.02
NEAR_TIE = 0.1
# FLASH_ATTN with an fp8 cache against itself over the comparisons bf16's
# NEAR_TIE was measured over: eager against CUDA graphs and other prefill
# chunkings (benchmarks/RESULTS.md, run 22): divergences at reference margins
# up to 0.44, logprobs up to 2.83 apart before them (other chunkings alone:
# 0.25 and 1.11).
FP8_FLOOR = {"near_tie": 0.45, "atol": 2.84}


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs_gpus(n: int):
    return pytest.mark.skipif(gpu_count() < n, reason=f"needs {n} GPUs, this host has {gpu_count()}")


needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray")
# Both of vLLM's distributed executors, Ray's where ray is installed.
EXECUTORS = ["mp", pytest.param("ray", marks=needs_ray)]

# A device budget (kv_cache_memory_bytes) that keeps ``head_layers`` of a
# rank's head-layers resident for the 4096-token pool (257 blocks of 16
# tokens, 8 KiB per head-layer and block at head size 128 in bf16) besides
# STAGING_MIB of staging buffers (the setting staging_mib), so that auto
# placement leaves layers with different counts.
STAGING_MIB = 64


def uneven_budget(head_layers: int) -> int:
    return (STAGING_MIB << 20) + 257 * (8 * head_layers + 4) * 1024


def close(a: float, b: float, floor: dict | None = None) -> bool:
    if floor is not None:
        return abs(a - b) <= floor["atol"]
    return abs(a - b) <= BF16_LOGPROB_ATOL + BF16_LOGPROB_RTOL * abs(a)


_RESULTS: dict[str, dict] = {}


def run_engine(spec: dict, reuse: bool = True) -> dict:
    """One engine's outputs. With ``reuse`` a spec already run in this session
    is not run again (the runner is deterministic, test_repeatable checks
    that with ``reuse=False``), so the FLASH_ATTN references are shared
    between tests."""
    key = json.dumps(spec, sort_keys=True)
    if not reuse or key not in _RESULTS:
        _RESULTS[key] = _run_engine_process(key)
    return _RESULTS[key]


def _run_engine_process(spec_json: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(RUNNER), spec_json],
        capture_output=True, text=True, timeout=900,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    # A worker's own error can lie far above the engine's final traceback.
    # vLLM logs to stdout, a crash's tracebacks (faulthandler) go to stderr.
    errors = [line for line in proc.stderr.splitlines() if "Error:" in line]
    raise AssertionError(f"engine failed ({proc.returncode}); error lines:\n"
                         + "\n".join(errors[-20:]) + f"\nlast log lines:\n{proc.stdout[-3000:]}"
                         + f"\nlast output:\n{proc.stderr[-6000:]}")


def build_small_model(directory: Path) -> str:
    """The small real-weight model of these checks, written under ``directory``."""
    from vllm_headinfer.tiny_model import build_tiny_model

    return str(build_tiny_model(
        directory / "llama", "llama", num_layers=4, num_heads=8,
        num_kv_heads=SMALL_KV_HEADS, head_dim=128, vocab_size=2048, dtype="bfloat16",
    ))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return build_small_model(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def shaped_model(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from bench_headinfer import write_model

    return str(write_model(tmp_path_factory.mktemp("shaped"), layers=4))


def spec(model: str, backend: str, resident: int | None, dummy: bool, **extra) -> dict:
    return {"model": model, "backend": backend, "resident": resident, "dummy": dummy,
            "prompt_lens": PROMPT_LENS, "max_tokens": 24, **extra}


def _aligned(ref: dict, got: dict):
    """Per prompt of two runs: the pairs of logprobs on identical inputs
    (every prompt position, then the generated tokens before the first that
    differs) and that divergence, None or ``(step, reference token, token,
    reference margin)``."""
    for r, g in zip(ref["outputs"], got["outputs"]):
        pairs = [(pr, pg) for pr, pg in zip(r["prompt_logprobs"], g["prompt_logprobs"])
                 if pr is not None]
        divergence = None
        for step, (tr, tg) in enumerate(zip(r["token_ids"], g["token_ids"])):
            if tr != tg:
                divergence = (step, tr, tg, r["margins"][step])
                break
            pairs.append((r["logprobs"][step], g["logprobs"][step]))
        yield pairs, divergence


def compare(ref: dict, got: dict, near_ties: bool = False, bitwise: bool = False,
            floor: dict | None = None) -> str:
    """Greedy tokens must be identical. With ``near_ties`` (configurations
    whose attention splits KV differently from the reference's, e.g. eager
    attention against captured graphs), only where the reference's choice is
    decided by more than bf16 rounding: a different token is accepted where
    the reference's two best tokens are within NEAR_TIE; the sequences then
    legitimately diverge and comparison of that one stops. Logprobs of
    identical tokens and of every prompt position (same inputs for both) must
    be within tolerance. With ``bitwise``, configurations whose every call
    splits KV as FLASH_ATTN's one call does must give bit-identical outputs.
    With ``floor`` (FP8_FLOOR) near-ties and tolerance are FLASH_ATTN's own
    run-to-run noise for that cache format instead of bf16 rounding.
    Returns a summary: near-tie divergences, the largest logprob difference,
    and whether the outputs are bit-identical."""
    near_tie = floor["near_tie"] if floor is not None else NEAR_TIE
    assert len(ref["outputs"]) == len(got["outputs"]) == len(PROMPT_LENS)
    ties, worst = 0, 0.0
    for pairs, divergence in _aligned(ref, got):
        for a, b in pairs:
            assert close(a, b, floor), (a, b)
            worst = max(worst, abs(a - b))
        if divergence is not None:
            step, tr, tg, margin = divergence
            assert near_ties and margin < near_tie, (
                f"step {step}: token {tg} instead of {tr}, reference margin {margin:.3f}"
            )
            ties += 1
    summary = (f"near-tie divergences {ties}, max logprob diff {worst:.3g}, "
               f"bit-identical {ref == got}")
    assert not bitwise or ref == got, f"not bit-identical: {summary}"
    return summary


def differences(ref: dict, got: dict) -> dict:
    """How far ``got`` is from ``ref``, asserting nothing (the noise floor's
    measurement, benchmarks/noise_floor.py): prompts whose greedy tokens
    diverge, the reference's margin between its two best tokens at each
    divergence, and the largest logprob difference before it (prompt
    positions included)."""
    margins, worst = [], 0.0
    for pairs, divergence in _aligned(ref, got):
        worst = max([worst, *(abs(a - b) for a, b in pairs)])
        if divergence is not None:
            margins.append(divergence[3])
    return {"diverged": len(margins), "prompts": len(ref["outputs"]),
            "margins_at_divergence": margins, "max_logprob_diff": worst,
            "bit_identical": ref == got}


def compare_each(cases: list[tuple[str, dict, dict]], near_ties: bool = False,
                 bitwise: bool = False) -> None:
    """compare() for every (label, reference, outputs) case, printing each
    summary, then failing with every case that failed: one flip must not hide
    how the other configurations did."""
    failures = []
    for label, ref, got in cases:
        try:
            print(f"{label}: {compare(ref, got, near_ties, bitwise)}")
        except AssertionError as e:
            print(f"{label}: FAILED {e}")
            failures.append(f"{label}: {e}")
    assert not failures, "\n".join(failures)
