"""HEADINFER with tensor parallelism over Ray, offline.

Runs only on a host with at least ``--tp`` CUDA GPUs, the CUDA vLLM build
(``pip install -e '.[cuda]'``) and ``ray`` installed (``pip install ray``); it
does not run on CPU machines.

    python examples/ray_tp.py [--tp 2] [--resident 1] [--model PATH]

Each tensor-parallel rank holds H = (KV heads of the model) / tp KV heads per
layer; ``resident_kv_heads`` counts heads per rank (0..H) and ``cpu_kv_gib`` is
host memory per rank, so a node with tp ranks pins tp * cpu_kv_gib GiB. The
Ray workers find the plugin through vLLM's entry points, like every other vLLM
process: install it on every node of the Ray cluster.

Without ``--model`` a tiny random Llama (8 KV heads, bf16) is built locally.
The script generates with HEADINFER, then with the default backend at the same
tensor-parallel size, and exits 0 when the greedy tokens are identical.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

PROMPTS = [
    "the quick brown fox jumps over the lazy dog",
    "long contexts need more key value cache than a single device holds " * 20,
]


def generate(model: str, tp: int, **backend) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model,
        tensor_parallel_size=tp,
        distributed_executor_backend="ray",
        dtype="bfloat16",
        max_model_len=4096,
        gpu_memory_utilization=0.3,
        seed=0,
        **backend,
    )
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return [list(t) for t in outs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=2, help="tensor_parallel_size (default 2)")
    ap.add_argument("--resident", type=int, default=1, help="resident KV heads per rank")
    ap.add_argument("--cpu-kv-gib", type=float, default=1.0, help="host KV GiB per rank")
    ap.add_argument("--model", help="model path or name (default: a tiny random Llama)")
    args = ap.parse_args()

    model = args.model
    if model is None:
        from vllm_headinfer.tiny_model import build_tiny_model

        model = str(
            build_tiny_model(
                Path(tempfile.gettempdir()) / "headinfer-ray-llama",
                "llama",
                num_layers=4,
                num_heads=16,
                num_kv_heads=8,
                head_dim=64,
                dtype="bfloat16",
            )
        )

    hi = generate(
        model,
        args.tp,
        attention_backend="HEADINFER",
        additional_config={
            "headinfer": {"resident_kv_heads": args.resident, "cpu_kv_gib": args.cpu_kv_gib}
        },
    )
    base = generate(model, args.tp)
    for i, (a, b) in enumerate(zip(hi, base)):
        status = "identical" if a == b else "DIFFERENT"
        print(f"prompt {i}: {status} ({len(a)} tokens)")
    return 0 if hi == base else 1


if __name__ == "__main__":
    sys.exit(main())
