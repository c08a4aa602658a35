"""``vllm serve`` whose CPU co-attention serving thread is killed mid-decode:
the GPU host's check that a served engine reports the failure (the request
fails, /health stops answering 200) within seconds instead of hanging.

Usage (one command, a few minutes with a cold numba cache):

    python tests/gpu/serve_with_killed_coattention.py [MODEL_DIR]

It builds the GPU tests' small model (engine_compare.small_model's shape)
where no MODEL_DIR is given, starts the server in a new process group,
sends a long greedy completion, and prints what the request got, when
/health stopped answering 200 and the server's lines naming co-attention;
it exits 0 where both came within FAIL_WITHIN_S of the kill, 1 otherwise.
``python ... serve MODEL [vllm serve options]`` is the server itself.

The kill is the serving loop's own stop word set behind the service's back
once the kernel has served KILL_AFTER_CALLS decode layer calls (environment,
default 200): the thread returns as if stopped, and the calls the GPU has
published or will publish are never served, which is what a dead thread
leaves. It is patched in at import, so that the engine-core process has it
too (a forked one inherits it, a spawned one imports this module again).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vllm_headinfer.coattention import service as coattention_service
from vllm_headinfer.coattention.share import CALLS

KILL_AFTER_CALLS = int(os.environ.get("KILL_AFTER_CALLS", "200"))
# The watchdog's bound (service.SERVE_TIMEOUT_S), then a step, the engine's
# error and the server's reaction.
FAIL_WITHIN_S = coattention_service.SERVE_TIMEOUT_S + 20
STARTUP_TIMEOUT_S = 180
KILLED = "KILLED the co-attention serving thread"
_start = coattention_service.CoattentionService._start


def _start_then_kill(self) -> None:
    _start(self)

    def kill() -> None:
        while CALLS["decode"] < KILL_AFTER_CALLS:
            time.sleep(1e-3)
        if not self.control[coattention_service.STOP]:
            self.control[coattention_service.STOP] = 1
            print(f"{KILLED} at {time.time():.3f}", flush=True)

    threading.Thread(target=kill, daemon=True).start()


coattention_service.CoattentionService._start = _start_then_kill


def serve(argv: list[str]) -> None:
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *argv]
    main()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5) -> int | None:
    """The HTTP status of a GET, None where nothing answered."""
    import requests

    try:
        return requests.get(url, timeout=timeout).status_code
    except requests.RequestException:
        return None


def check(model: str, workdir: Path) -> bool:
    import requests

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = workdir / "server.log"
    config = {"headinfer": {"resident_kv_heads": 0, "cpu_kv_gib": 4, "cpu_attention": 2}}
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, __file__, "serve", model, "--served-model-name", "small",
             "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
             "--max-model-len", "4096", "--max-num-batched-tokens", "512", "--enforce-eager",
             "--gpu-memory-utilization", "0.3", "--attention-backend", "HEADINFER",
             "--additional-config", json.dumps(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while _get(f"{base}/health") != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                print(f"FAIL: the server did not come up; its log: {log_path}")
                return False
            time.sleep(1)
        body = {"model": "small", "prompt": list(range(3, 1003)), "max_tokens": 3000,
                "temperature": 0, "ignore_eos": True}
        try:
            reply = requests.post(f"{base}/v1/completions", json=body, timeout=120)
            request = f"HTTP {reply.status_code}: {reply.text[:300]}"
            request_failed = reply.status_code != 200
        except requests.RequestException as error:
            request, request_failed = f"no answer ({type(error).__name__})", True
        answered_at = time.time()
        unhealthy_at = None
        while time.time() < answered_at + FAIL_WITHIN_S:
            if _get(f"{base}/health") != 200:
                unhealthy_at = time.time()
                break
            time.sleep(0.5)
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()
    lines = log_path.read_text(errors="replace").splitlines()
    kills = [float(line.rsplit(" ", 1)[1]) for line in lines if KILLED in line]
    print("\n".join(line for line in lines if "co-attention" in line)[-4000:])
    if not kills:
        print(f"FAIL: the serving thread was never killed (fewer than {KILL_AFTER_CALLS} "
              f"decode layer calls?): {request}; the server's log: {log_path}")
        return False
    killed_at = kills[0]
    print(f"request: {request}, {answered_at - killed_at:.1f} s after the kill")
    print("/health: " + (f"not 200 {unhealthy_at - killed_at:.1f} s after the kill"
                         if unhealthy_at is not None else "still 200"))
    ok = (request_failed and answered_at - killed_at < FAIL_WITHIN_S
          and unhealthy_at is not None and unhealthy_at - killed_at < FAIL_WITHIN_S
          and "HEADINFER CPU co-attention failed" in "\n".join(lines))
    print(("PASS" if ok else "FAIL") + f"; the server's log: {log_path}")
    return ok


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2:])
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="killed-coattention-"))
    model = sys.argv[1] if len(sys.argv) > 1 else None
    if model is None:
        from vllm_headinfer.tiny_model import build_tiny_model

        model = str(build_tiny_model(workdir / "small", "llama", num_layers=4, num_heads=8,
                                     num_kv_heads=4, head_dim=128, vocab_size=2048,
                                     dtype="bfloat16"))
    return 0 if check(model, workdir) else 1


if __name__ == "__main__":
    sys.exit(main())
