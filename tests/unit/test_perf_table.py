"""The decode table's limits: a step's offloaded bytes over the link's read
rate and over host memory's rate with both readers, from the benchmark's
own summary of a run (benchmarks/bench_headinfer.py, perf_table.py).
Figures of the issue's H100 host: 128K tokens x 32 layers x 8 heads of
bf16 KV is 17.2 GB a step; at 119.5 GB/s that is 0.144 s."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench, table = load("bench_headinfer"), load("perf_table")
CONTEXT = 131072
BYTES_PER_TOKEN = 32 * 8 * bench.KV_BYTES_PER_TOKEN_LAYER_HEAD  # every head offloaded


def run_rows(config: str, per_token: float, first: float, steady: float, memory_gbs=119.5):
    spec = {"config": config, "layers": 32, "tp": 1}
    res = {"link_bytes_per_token": per_token,
           "rows": [{"context": CONTEXT, "decode_s_per_token": steady, "prefill_tok_s": 1e4,
                     "decode_s_per_token_first": first, "decode_s_per_token_steady": steady}]}
    return bench.summarise(spec, res, h2d_gbs=55.0, read_gbs=50.0, host_memory_gbs=memory_gbs)


def test_limits_are_the_step_bytes_over_each_rate():
    (row,) = run_rows("R0+cpuauto", BYTES_PER_TOKEN, first=0.247, steady=0.206)
    step = CONTEXT * BYTES_PER_TOKEN
    assert step == pytest.approx(17.18e9, rel=1e-3)
    assert row["link_limit_s_per_token"] == pytest.approx(step / 50e9)
    assert row["host_memory_limit_s_per_token"] == pytest.approx(0.1438, abs=1e-4)


def test_nothing_offloaded_has_no_limits():
    (row,) = run_rows("FLASH_ATTN", 0, first=0.0122, steady=0.0122)
    assert row["link_limit_s_per_token"] is None and row["host_memory_limit_s_per_token"] is None


def test_tensor_parallel_runs_give_no_host_memory_limit():
    spec = {"config": "R0", "layers": 32, "tp": 2}
    res = {"link_bytes_per_token": BYTES_PER_TOKEN / 2,
           "rows": [{"context": CONTEXT, "decode_s_per_token": 0.2, "prefill_tok_s": 1e4}]}
    (row,) = bench.summarise(spec, res, h2d_gbs=55.0, read_gbs=50.0, host_memory_gbs=119.5)
    # Two links read the step's bytes: each its rank's half.
    assert row["link_limit_s_per_token"] == pytest.approx(CONTEXT * BYTES_PER_TOKEN / 100e9)
    assert row["host_memory_limit_s_per_token"] is None


def test_the_table_puts_each_figure_beside_its_limits():
    report = {"h2d_gbs": 55.0, "kernel_read_gbs": 50.0, "host_memory_gbs": 119.5,
              "host_memory_cpu_gbs": 73.5, "host_memory_gpu_gbs": 46.0, "host_memory_threads": 15,
              "kv_cache_dtype": "auto",
              "rows": run_rows("FLASH_ATTN", 0, 0.0122, 0.0122)
              + run_rows("R0+cpuauto", BYTES_PER_TOKEN, first=0.247, steady=0.206)}
    text = table.render([report])
    assert "host memory, both readers at once: 119.5 GB/s (CPU kernel 73.5 GB/s on 15 threads" in text
    lines = {ln.split(" | ")[0]: ln for ln in text.splitlines() if ln.startswith("| ")}
    assert lines["| FLASH_ATTN (bf16)"].endswith("| 0.012 s | 0.012 s | - | - | - | - |")
    # 0.144 s of host-memory limit against 0.247 s first and 0.206 s steady.
    assert lines["| R0+cpuauto (bf16)"] == (
        "| R0+cpuauto (bf16) | 128K | 0.247 s | 0.206 s | 0.344 s | 0.144 s | 58% | 70% |")


def test_speculative_limits_are_a_steps_bytes_over_its_tokens():
    base = {"h2d_gbs": 55.0, "kernel_read_gbs": 50.0, "host_memory_gbs": 100.0, "rows": []}
    step_s, step_bytes = 0.4, 20e9
    spec = {"context": CONTEXT, "runs": {"R0+ngram7": {
        "step_s": step_s, "decode_tok_s": 4 / step_s, "tokens_per_step": 4.0,
        "kv_read_gbs": step_bytes / step_s / 1e9, "mean_acceptance_length": 4.0}}}
    (row,) = table.speculative_rows(spec, base)
    # 20 GB a step: 0.4 s over the link, 0.2 s in host memory; 4 tokens a step.
    assert row[0] == "R0+ngram7 (bf16, speculative run, acceptance 4.00)"
    assert row[3:6] == ["0.100 s", "0.100 s", "0.050 s"]
