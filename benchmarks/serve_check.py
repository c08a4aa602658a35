"""``vllm serve`` with HEADINFER on a Llama-3-8B-shaped model (4 layers, dummy
weights): waits for /health, sends one completion, then reads /metrics and
prints the ``headinfer:`` series next to vLLM's running-requests gauge.

    python3 benchmarks/serve_check.py --out DIR [--resident 2] [--cpu-kv-gib 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LLAMA_3_8B_4L = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 4, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}


def get(url: str, data: dict | None = None, timeout: float = 60) -> str:
    req = urllib.request.Request(
        url, data=None if data is None else json.dumps(data).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--resident", type=int, default=2)
    ap.add_argument("--cpu-kv-gib", type=float, default=8)
    ap.add_argument("--port", type=int, default=8011)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(tempfile.mkdtemp())
    (model / "config.json").write_text(json.dumps(LLAMA_3_8B_4L))
    settings = {"resident_kv_heads": args.resident, "cpu_kv_gib": args.cpu_kv_gib}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--load-format", "dummy", "--skip-tokenizer-init", "--max-model-len", "32768",
           "--gpu-memory-utilization", "0.5", "--port", str(args.port),
           "--attention-backend", "HEADINFER",
           "--additional-config", json.dumps({"headinfer": settings})]
    base = f"http://127.0.0.1:{args.port}"
    result: dict = {"command": cmd}
    with open(out / "serve.log", "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 400:
                try:
                    get(base + "/health", timeout=5)
                    break
                except OSError:
                    if server.poll() is not None:
                        raise RuntimeError(f"server exited with {server.returncode}") from None
                    time.sleep(2)
            result["startup_s"] = round(time.monotonic() - t0, 1)
            completion = json.loads(get(base + "/v1/completions", {
                "model": str(model), "prompt": list(range(1000, 3000)), "max_tokens": 16,
                "temperature": 0}))
            result["completion_tokens"] = completion["usage"]["completion_tokens"]
            metrics = get(base + "/metrics")
            result["metrics"] = [ln for ln in metrics.splitlines()
                                 if ln.startswith("headinfer:") or ln.startswith("vllm:num_requests_running")]
        except Exception as e:  # noqa: BLE001 - reported
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            server.terminate()
            try:
                result["exit_code"] = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                result["exit_code"] = "killed"
    (out / "serve_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=1))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
