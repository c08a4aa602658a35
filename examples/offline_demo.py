"""HeadInfer in vLLM, end to end, on any machine (CPU or one CUDA GPU).

    python examples/offline_demo.py [RESIDENT_KV_HEADS]

Builds a tiny random Llama checkpoint locally (no model hub needed), generates
with ``attention_backend="HEADINFER"`` keeping RESIDENT_KV_HEADS (default 0) of
its 4 KV heads per layer in vLLM's device KV pages and the others in host
memory, prints where the KV lives and how much fits, then generates the same
prompts with vLLM's default attention backend and checks that the greedy
tokens are identical. Exit status 0 means they are.

The model's weights are random, so the text is gibberish; what matters is that
both backends produce the same gibberish.
"""

from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path

NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 8, 4, 64
BLOCK_SIZE = 32
PROMPTS = [
    "the quick brown fox jumps over the lazy dog",
    "host memory is large and the link streams what the device lacks",
    "attention heads are independent so each can live in its own memory " * 12,
]
MAX_TOKENS = 32


def engine_kwargs(dtype: str) -> dict:
    return dict(
        dtype=dtype,
        max_model_len=2048,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=256 << 20,
        enforce_eager=True,
        seed=0,
    )


def generate(model: Path, dtype: str, **backend) -> tuple[list, dict]:
    from vllm import LLM, SamplingParams

    llm = LLM(str(model), **engine_kwargs(dtype), **backend)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1, ignore_eos=True)
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    results = [
        {
            "token_ids": list(c.token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
            "text": c.text,
        }
        for c in outs
    ]
    cfg = llm.llm_engine.vllm_config
    info = {
        "num_blocks": cfg.cache_config.num_gpu_blocks,
        "settings": (cfg.additional_config or {}).get("headinfer"),
        "backend": cfg.attention_config.backend,
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return results, info


def print_placement(info: dict, dtype: str) -> None:
    """Where each layer's KV lives, from the same spec HEADINFER gives vLLM."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_headinfer.spec import split_spec

    settings = info["settings"]
    r = settings["resident_kv_heads"]
    spec = split_spec(
        FullAttentionSpec(
            block_size=BLOCK_SIZE,
            num_kv_heads=NUM_KV_HEADS,
            head_size=HEAD_DIM,
            dtype=getattr(torch, dtype),
        ),
        r,
    )
    blocks = info["num_blocks"]
    dev = blocks * spec.page_size_bytes * NUM_LAYERS
    host = blocks * spec.host_page_size_bytes * NUM_LAYERS
    mib = 1 << 20
    print("\n=== HEADINFER placement ===")
    print(f"resident_kv_heads R = {r} of H = {NUM_KV_HEADS} KV heads, in each of {NUM_LAYERS} layers")
    for layer in range(NUM_LAYERS):
        resident = f"heads 0..{r - 1} in device KV pages" if r else "no head on the device"
        offloaded = (
            f"heads {r}..{NUM_KV_HEADS - 1} in host memory" if r < NUM_KV_HEADS else "none offloaded"
        )
        print(f"  layer {layer}: {resident}; {offloaded}")
    if r == 0:
        print("  (with R = 0 the device page is a placeholder of one element per token)")
    print(f"device KV: {dev / mib:.2f} MiB   host KV: {host / mib:.2f} MiB "
          f"(cpu_kv_gib = {settings['cpu_kv_gib']} GiB)")
    print(f"capacity: {blocks} blocks of {BLOCK_SIZE} tokens = {(blocks - 1) * BLOCK_SIZE} tokens")


def main() -> int:
    from vllm.platforms import current_platform

    from vllm_headinfer.tiny_model import build_tiny_model

    resident = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    # float32 on CPU; CUDA attention kernels want half precision.
    dtype = "bfloat16" if current_platform.is_cuda() else "float32"
    model = build_tiny_model(
        Path(tempfile.gettempdir()) / f"headinfer-demo-llama-{dtype}",
        "llama",
        num_layers=NUM_LAYERS,
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=dtype,
    )
    print(f"tiny random Llama at {model} ({dtype})")

    hi, info = generate(
        model,
        dtype,
        attention_backend="HEADINFER",
        additional_config={"headinfer": {"resident_kv_heads": resident, "cpu_kv_gib": 0.25}},
    )
    assert info["backend"] is not None and info["backend"].name == "HEADINFER"
    print_placement(info, dtype)
    print("\n=== HEADINFER output ===")
    for prompt, out in zip(PROMPTS, hi):
        print(f"{prompt[:50]!r:55} -> {out['text']!r}")

    base, _ = generate(model, dtype)
    same = all(a["token_ids"] == b["token_ids"] for a, b in zip(hi, base))
    worst = max(
        abs(x - y) for a, b in zip(hi, base) for x, y in zip(a["logprobs"], b["logprobs"])
    )
    print("\n=== default backend ===")
    if same:
        print(f"identical greedy tokens for all {len(PROMPTS)} prompts "
              f"(largest logprob difference {worst:.1e})")
        return 0
    for i, (a, b) in enumerate(zip(hi, base)):
        if a["token_ids"] != b["token_ids"]:
            print(f"prompt {i}: HEADINFER {a['token_ids']}\n          default   {b['token_ids']}")
    print("MISMATCH between HEADINFER and the default backend")
    return 1


if __name__ == "__main__":
    sys.exit(main())
