"""One decode table from one run's benchmark files, with the two physical
limits measured in that run beside every figure:

    python3 benchmarks/perf_table.py perf_bf16.json [perf_fp8.json ...] [--spec spec.json]

The inputs are ``bench_headinfer.py`` reports made with ``--both-readers``
and ``--steady-tokens`` (and optionally one ``bench_speculative.py`` report
of the same host). For every configuration and context it gives the mean
time per token over the first decode tokens after prefill and at steady
state, and the limits of a step's offloaded bytes:

* **link**: over the rate the GPU's kernels read pinned host memory (what
  any design that streams the bytes to the GPU can reach);
* **host memory**: over the rate host memory gives the CPU kernel and the
  GPU reading at once (what CPU co-attention can at best reach).

A speculative configuration's figure is per generated token; its limits are
a step's (one read of the offloaded bytes) over the tokens a step gave.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def share(limit: float | None, measured: float | None) -> str:
    """How close ``measured`` comes to ``limit`` (100% is the limit)."""
    if limit is None or not measured:
        return "-"
    return f"{limit / measured:.0%}"


def dtype_of(report: dict) -> str:
    """The KV cache's dtype a report was timed with (the model's is bf16)."""
    return "fp8" if report.get("kv_cache_dtype", "auto") != "auto" else "bf16"


def decode_rows(report: dict) -> list[list[str]]:
    out = []
    for row in report["rows"]:
        first, steady = row.get("decode_s_per_token_first"), row.get("decode_s_per_token_steady")
        link, memory = row.get("link_limit_s_per_token"), row.get("host_memory_limit_s_per_token")
        out.append([f"{row['config']} ({dtype_of(report)})", f"{row['context'] // 1024}K",
                    seconds(first), seconds(steady), seconds(link), seconds(memory),
                    share(memory, first), share(memory, steady)])
    return out


def speculative_rows(spec: dict, limits: dict) -> list[list[str]]:
    """The speculative report's configurations, with the limits of a step's
    bytes at the rates ``limits`` (the bf16 report's, same host) gives."""
    out = []
    for name, run in spec["runs"].items():
        if "step_s" not in run:
            continue
        per_token = 1 / run["decode_tok_s"]
        # One read of the offloaded bytes per step, shared by the tokens it gave.
        token_bytes = (run.get("kv_read_gbs") or 0) * 1e9 * run["step_s"] / run["tokens_per_step"]
        link = memory = None
        if token_bytes:
            link = token_bytes / (limits["kernel_read_gbs"] * 1e9)
            if limits.get("host_memory_gbs"):
                memory = token_bytes / (limits["host_memory_gbs"] * 1e9)
        accept = run.get("mean_acceptance_length")
        label = f"{name} (bf16, speculative run{f', acceptance {accept:.2f}' if accept else ''})"
        out.append([label, f"{spec['context'] // 1024}K", "-", seconds(per_token), seconds(link),
                     seconds(memory), "-", share(memory, per_token)])
    return out


def rates(report: dict) -> str:
    """The rates a report's limits come from, measured at its start."""
    text = (f"link: kernels read pinned host memory at {report['kernel_read_gbs']:.1f} GB/s "
            f"(copies: {report['h2d_gbs']:.1f} GB/s)")
    if report.get("host_memory_gbs"):
        text += (f"; host memory, both readers at once: {report['host_memory_gbs']:.1f} GB/s "
                 f"(CPU kernel {report['host_memory_cpu_gbs']:.1f} GB/s on "
                 f"{report['host_memory_threads']} threads, GPU {report['host_memory_gpu_gbs']:.1f} GB/s)")
    return text


def render(reports: list[dict], spec: dict | None = None) -> str:
    lines = [f"* {dtype_of(r)} run's {rates(r)}" for r in reports]
    lines += [
        "",
        "| configuration | context | first tokens | steady state | link limit | host-memory limit "
        "| of the host-memory limit (first) | (steady) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [r for report in reports for r in decode_rows(report)]
    if spec is not None:
        rows += speculative_rows(spec, reports[0])
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path,
                    help="bench_headinfer.py reports (the first one's rates also bound --spec's rows)")
    ap.add_argument("--spec", type=Path, help="a bench_speculative.py report of the same host")
    args = ap.parse_args(argv)
    reports = [json.loads(p.read_text()) for p in args.reports]
    spec = json.loads(args.spec.read_text()) if args.spec else None
    print(render(reports, spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
