"""The OpenAI-compatible server with --attention-backend HEADINFER answers like
the server with the default backend, on one rank, at tensor-parallel size 2
and with speculative decoding (``ngram``, the same config for both servers).

Each pair of servers starts with ``python -m vllm.entrypoints.openai.api_server``
on 127.0.0.1 (the CLI entry point the CPU build supports), side by side, and is
killed with its process groups in teardown before the next pair starts.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from conftest import LOGPROB_TOL, REPO, cpu_thread_binding, free_port, on_all_cores, placement_of

STARTUP_TIMEOUT = 300
HEADINFER_CONFIG = {"headinfer": {"resident_kv_heads": 1, "cpu_kv_gib": 0.05}}
NGRAM = ["--speculative-config", json.dumps({
    "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2})]
# Server pairs: model shape, tensor-parallel size and arguments both servers
# get. At TP = 2 the 4-KV-head model leaves 2 heads per rank, so R = 1 splits
# inside each rank as R = 1 of 2 does on one rank; placement reads (1, 2, 1)
# in all pairs.
PAIRS = {"tp1": ("llama-gqa", 1, []), "tp2": ("llama-mha", 2, []), "tp1-ngram": ("llama-gqa", 1, NGRAM)}

WORDS = (
    "the quick brown fox jumps over the lazy dog attention heads are independent "
    "so each can live in its own memory long contexts need more key value cache "
    "than a single device holds host memory is large and the link streams"
).split()
PROMPTS = [
    "the quick brown fox",
    "host memory is large and",
    " ".join(WORDS * 4),  # a few hundred tokens: several prefill chunks
    "numbers 0 1 2 3 and symbols ( ) [ ]",
]


def _start(model: str, log_path, extra: list[str], env: dict[str, str]):
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "1024", "--block-size", "32",
        "--max-num-batched-tokens", "64", "--enforce-eager", "--seed", "0",
        "--kv-cache-memory-bytes", str(64 << 20),
        *extra,
    ]  # fmt: skip
    log = open(log_path, "w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        cwd=str(REPO), start_new_session=True, env={**os.environ, **env},
        preexec_fn=on_all_cores,
    )
    return {"proc": proc, "port": port, "log": log, "log_path": log_path}


def _wait_ready(server, deadline):
    url = f"http://127.0.0.1:{server['port']}/v1/models"
    while time.monotonic() < deadline:
        if server["proc"].poll() is not None:
            raise AssertionError(
                f"server exited with {server['proc'].returncode}:\n" + _tail(server["log_path"])
            )
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"server not ready in {STARTUP_TIMEOUT} s:\n" + _tail(server["log_path"]))


def _tail(path, n=60):
    return "\n".join(open(path, errors="replace").read().splitlines()[-n:])


def _stop(server):
    proc = server["proc"]
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        # Engine-core and worker processes are in the same group.
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    server["log"].close()


@pytest.fixture(scope="module", params=list(PAIRS))
def servers(request, tiny_models, tmp_path_factory):
    shape, tp, extra = PAIRS[request.param]
    model = tiny_models(shape)
    env = {}
    if tp > 1:
        # On CPU, gpu_memory_utilization is the share of RAM each worker
        # checks is free at start; 2 * tp workers start at once here.
        extra = [*extra, "--tensor-parallel-size", str(tp), "--gpu-memory-utilization", "0.2"]
        env = {"VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(tp)}
    logs = tmp_path_factory.mktemp(f"servers-{request.param}")
    started = {}
    try:
        started["default"] = _start(model, logs / "default.log", extra, env)
        started["headinfer"] = _start(
            model,
            logs / "headinfer.log",
            [*extra, "--attention-backend", "HEADINFER",
             "--additional-config", json.dumps(HEADINFER_CONFIG)],
            env,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for server in started.values():
            _wait_ready(server, deadline)
        yield started
    finally:
        for server in started.values():
            _stop(server)


def _complete(server, prompt):
    r = requests.post(
        f"http://127.0.0.1:{server['port']}/v1/completions",
        json={
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 16,
            "temperature": 0,
            "logprobs": 1,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_server_runs_headinfer(servers):
    lines = open(servers["headinfer"]["log_path"], errors="replace").read().splitlines()
    p = placement_of([ln for ln in lines if "HEADINFER placement" in ln])
    assert (p["resident"], p["heads"], p["offloaded"]) == (1, 2, 1)
    default_log = open(servers["default"]["log_path"], errors="replace").read()
    assert "HEADINFER placement" not in default_log


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_completions_match_default_backend(servers, i):
    base = _complete(servers["default"], PROMPTS[i])
    hi = _complete(servers["headinfer"], PROMPTS[i])
    assert len(base["logprobs"]["tokens"]) == 16
    assert hi["logprobs"]["tokens"] == base["logprobs"]["tokens"]
    assert hi["text"] == base["text"]
    worst = max(
        abs(a - b)
        for a, b in zip(base["logprobs"]["token_logprobs"], hi["logprobs"]["token_logprobs"])
    )
    assert worst <= LOGPROB_TOL


def _headinfer_metrics(server, prefix: str | tuple[str, ...] = "headinfer:") -> dict[str, float]:
    """The samples of one scrape of the server's /metrics whose names start
    with ``prefix`` (HEADINFER's own by default), by name."""
    text = requests.get(f"http://127.0.0.1:{server['port']}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def test_metrics_show_placement_and_link_load(servers):
    lines = open(servers["headinfer"]["log_path"], errors="replace").read().splitlines()
    p = placement_of([ln for ln in lines if "HEADINFER placement" in ln])
    m = _headinfer_metrics(servers["headinfer"])
    assert m["headinfer:resident_head_layers"] == p["resident_head_layers"]
    assert m["headinfer:offloaded_head_layers"] == p["head_layers"] - p["resident_head_layers"]
    assert m["headinfer:pool_tokens"] == p["tokens"]
    assert m["headinfer:host_kv_bytes"] / (1 << 30) == pytest.approx(p["host_gib"], abs=1e-3)
    assert m["headinfer:device_kv_bytes"] / (1 << 30) == pytest.approx(p["device_gib"], abs=1e-3)
    host_per_block = m["headinfer:host_kv_bytes"] / p["blocks"]
    assert _headinfer_metrics(servers["default"]) == {}

    # While requests decode, the link-load series shows the offloaded KV of
    # their blocks: a whole number of blocks' host pages, more than none;
    # with none running, nothing. Each scrape is checked against vLLM's own
    # count of running requests in the same scrape (both are set from one
    # step's scheduler stats, in one call). On a busy 2-core machine the
    # engine can finish a request before the API server answers a single
    # scrape in between (it then catches up in a burst), so eight long
    # requests run at once and /metrics is scraped until one shows them
    # running; up to five rounds.
    url = f"http://127.0.0.1:{servers['headinfer']['port']}/v1/completions"
    link, running = "headinfer:host_kv_read_bytes_per_step", "vllm:num_requests_running"

    def stream():
        with requests.post(url, json={"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 500,
                                      "temperature": 0, "ignore_eos": True, "stream": True},
                           stream=True, timeout=300) as r:
            assert r.status_code == 200, r.text
            for _ in r.iter_lines():
                pass

    scrapes = []
    for _ in range(5):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(stream) for _ in range(8)]
            while not any(s[running] > 0 for s in scrapes) and not all(f.done() for f in streams):
                scrapes.append(_headinfer_metrics(servers["headinfer"], prefix=(link, running)))
                time.sleep(0.005)
            for f in streams:
                f.result()
        if any(s[running] > 0 for s in scrapes):
            break
    for s in scrapes:
        v = s[link]
        assert v / host_per_block == pytest.approx(round(v / host_per_block)), (v, host_per_block)
    # The two gauges are set by two loggers one after the other, so a scrape
    # may fall between them at a step where requests start or end: the load
    # must show while requests run, and be gone once none does.
    idle = _headinfer_metrics(servers["headinfer"], prefix=(link, running))
    assert idle[running] == 0 and idle[link] == 0, idle
    if not any(s[running] > 0 for s in scrapes):
        pytest.skip(f"no scrape of {len(scrapes)} came while a request ran (a busy machine)")
    assert any(s[running] > 0 and s[link] > 0 for s in scrapes), scrapes


def test_speculative_server_verifies_drafts(servers, request):
    """With ngram, the HEADINFER server proposed drafts and accepted some
    (its completions above matched the default server's): verify steps of
    several query tokens ran over the offloaded head."""
    if not PAIRS[request.node.callspec.params["servers"]][2]:
        pytest.skip("no speculative config in this pair")
    m = _headinfer_metrics(servers["headinfer"], "vllm:spec_decode")
    assert m["vllm:spec_decode_num_drafts_total"] > 0, m
    assert m["vllm:spec_decode_num_accepted_tokens_total"] > 0, m
