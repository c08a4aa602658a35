"""The OpenAI server with HEADINFER under client faults.

One server (R = 0: every head in the host pool) on 127.0.0.1:
* requests vLLM refuses (a prompt longer than max_model_len, an empty
  prompt) get HTTP 400 with vLLM's message, and the server keeps serving;
  max_tokens past the context ends the request at the context, as vLLM does;
* streamed completions cancelled by their clients mid-stream free their KV
  blocks (vLLM's KV usage and HEADINFER's link-load series return to 0) while
  another stream runs on, and that stream's text equals the same request
  served alone;
* SIGTERM during requests ends the server within 30 s and gives its host
  pool's memory back.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
import requests
from test_openai_server import _start, _stop, _wait_ready

MAX_MODEL_LEN = 1024
HEADINFER = ["--attention-backend", "HEADINFER",
             "--additional-config", json.dumps({"headinfer": {"resident_kv_heads": 0, "cpu_kv_gib": 0.05}})]


def _alive_in_group(pgid: int) -> list[str]:
    """The processes of this process group that still run (zombies hold no memory)."""
    alive = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {p.info['name']}")
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def _url(server, path):
    return f"http://127.0.0.1:{server['port']}{path}"


def _post(server, **body):
    return requests.post(_url(server, "/v1/completions"), json={"model": "tiny", "temperature": 0, **body},
                         timeout=120)


def _metric(server, name):
    for line in requests.get(_url(server, "/metrics"), timeout=30).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    s = _start(tiny_models("llama-gqa"), tmp_path_factory.mktemp("faults") / "server.log", HEADINFER, {})
    try:
        _wait_ready(s, time.monotonic() + 300)
        yield s
    finally:
        _stop(s)


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"prompt": [5] * (MAX_MODEL_LEN + 50), "max_tokens": 4}, "maximum context length"),
        ({"prompt": "", "max_tokens": 4}, "empty"),
    ],
    ids=["prompt-too-long", "empty-prompt"],
)
def test_refused_requests_get_400_and_the_server_goes_on(server, body, needle):
    r = _post(server, **body)
    assert r.status_code == 400, r.text
    assert needle in r.text.lower() or needle in r.text, r.text
    ok = _post(server, prompt="the quick brown fox", max_tokens=4)
    assert ok.status_code == 200, ok.text


def test_max_tokens_past_the_context_stops_at_the_context(server):
    """vLLM 0.32 clips max_tokens to the room left in max_model_len rather
    than refusing; with HEADINFER the request fills the context exactly."""
    r = _post(server, prompt=[5] * (MAX_MODEL_LEN - 10), max_tokens=100, ignore_eos=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == MAX_MODEL_LEN


def _stream(server, prompt, max_tokens, stop_after, out):
    """Streams a completion; closes the connection after ``stop_after``
    chunks (None: reads to the end). Appends the text read to ``out``."""
    with requests.post(_url(server, "/v1/completions"), stream=True, timeout=300,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                             "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        for i, line in enumerate(r.iter_lines()):
            if line.startswith(b"data: {"):
                out.append(json.loads(line[6:])["choices"][0]["text"])
            if stop_after is not None and i >= stop_after:
                return


def test_cancelled_streams_free_their_blocks(server):
    survivor = "host memory is large and the link streams " * 6
    texts: dict[str, list] = {"a": [], "b": [], "survivor": []}
    threads = [
        threading.Thread(target=_stream, args=(server, "the quick brown fox " * 20, 400, 8, texts["a"])),
        threading.Thread(target=_stream, args=(server, "attention heads are independent " * 10, 400, 15, texts["b"])),
        threading.Thread(target=_stream, args=(server, survivor, 120, None, texts["survivor"])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(texts["a"]) < 400 and len(texts["b"]) < 400
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _metric(server, "vllm:kv_cache_usage_perc") == 0 and (
            _metric(server, "headinfer:host_kv_read_bytes_per_step") == 0
        ):
            break
        time.sleep(0.5)
    assert _metric(server, "vllm:kv_cache_usage_perc") == 0
    assert _metric(server, "headinfer:host_kv_read_bytes_per_step") == 0
    alone = _post(server, prompt=survivor, max_tokens=120, ignore_eos=True)
    assert alone.status_code == 200
    assert "".join(texts["survivor"]) == alone.json()["choices"][0]["text"]


def test_sigterm_ends_the_server_and_frees_its_pool(tiny_models, tmp_path_factory):
    pool_gib = 1.0
    before = psutil.virtual_memory().available
    args = ["--attention-backend", "HEADINFER", "--additional-config",
            json.dumps({"headinfer": {"resident_kv_heads": 0, "cpu_kv_gib": pool_gib}})]
    s = _start(tiny_models("llama-gqa"), tmp_path_factory.mktemp("sigterm") / "server.log", args, {})
    try:
        _wait_ready(s, time.monotonic() + 300)
        held = before - psutil.virtual_memory().available
        assert held > pool_gib * (1 << 30) * 0.9, f"the pool is not resident: {held >> 20} MiB held"
        load = [threading.Thread(target=_stream, args=(s, "the quick brown fox", 200, None, []))
                for _ in range(3)]
        for t in load:
            t.daemon = True
            t.start()
        time.sleep(2)
        t0 = time.monotonic()
        os.killpg(s["proc"].pid, signal.SIGTERM)
        s["proc"].wait(timeout=30)
        assert time.monotonic() - t0 < 30
        # The pool is freed once no process of the server (API server,
        # engine core) is left: judged by its process group, since the
        # machine's free memory moves with the engines of the test beside it.
        deadline = time.monotonic() + 20
        left = _alive_in_group(s["proc"].pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = _alive_in_group(s["proc"].pid)
        assert not left, left
    finally:
        _stop(s)
