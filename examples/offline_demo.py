"""HeadInfer in vLLM, end to end, on any machine (CPU or one CUDA GPU).

    python examples/offline_demo.py [RESIDENT_KV_HEADS] [--verbose]

Builds a tiny random Llama checkpoint locally (no model hub needed) and
generates with ``attention_backend="HEADINFER"``. RESIDENT_KV_HEADS is what
the ``resident_kv_heads`` setting takes: ``auto`` (the default), one count
for every layer (``0`` to ``4``) or one per layer (``4,2,1,0``). The device KV
budget is kept small (8 MiB, a quarter of the pool's 2048 tokens), so auto
placement keeps some heads of each layer in vLLM's device KV pages and the
others in host memory. The demo prints where each layer's KV lives, then
generates the same prompts with vLLM's default attention backend and checks
that the greedy tokens are identical. Exit status 0 means they are.

The model's weights are random, so its text is gibberish by design; what
matters is that both backends produce the same gibberish. vLLM's own log is
kept to errors unless ``--verbose`` is given.
"""

from __future__ import annotations

import gc
import os
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


# A quarter of the pool's KV fits the device. On CUDA, offloading also takes
# device memory for staging buffers (staging_mib), counted in the budget.
DEVICE_KV_BYTES = 8 << 20
CUDA_STAGING_MIB = 64


def engine_kwargs(dtype: str) -> dict:
    return dict(
        dtype=dtype,
        max_model_len=2048,
        block_size=BLOCK_SIZE,
        enforce_eager=True,
        seed=0,
    )


def generate(model: Path, dtype: str, **backend) -> tuple[list, dict | None]:
    from vllm import LLM, SamplingParams

    from vllm_headinfer.metrics import read

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
    # The placement the engine core decided (None with the default backend).
    placement = read(llm.llm_engine.vllm_config, 0)
    # vLLM force-kills engine processes still up after 5 s, leaving its
    # shared-memory queues for the resource tracker to report as leaked; on a
    # busy machine their teardown can take longer.
    llm.llm_engine.engine_core.shutdown(timeout=60)
    del llm
    gc.collect()
    return results, placement


def heads(first: int, end: int) -> str:
    return f"head {first}" if end - first == 1 else f"heads {first}..{end - 1}"


def print_placement(placement: dict) -> None:
    mib = 1 << 20
    h = placement["num_kv_heads"]
    print("\n=== HEADINFER placement ===")
    print(f"{placement['resident_head_layers']} of {h * len(placement['counts'])} KV "
          "head-layers in vLLM's KV cache, the others in HEADINFER's host pool:")
    for layer, r in zip(placement["layer_indices"], placement["counts"]):
        resident = f"{heads(0, r)} in vLLM's KV cache" if r else "no head in vLLM's KV cache"
        offloaded = f"{heads(r, h)} in the host pool" if r < h else "none offloaded"
        print(f"  layer {layer}: {resident}; {offloaded}")
    print(f"device KV: {placement['device_kv_bytes'] / mib:.2f} MiB   "
          f"host KV: {placement['host_kv_bytes'] / mib:.2f} MiB   "
          f"pool: {placement['pool_tokens']} tokens")


def resident_setting(text: str):
    if text == "auto":
        return text
    if "," in text:
        return [int(x) for x in text.split(",")]
    return int(text)


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--verbose"]
    if "--verbose" not in sys.argv:
        # vLLM reads this when it is first imported.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from vllm.platforms import current_platform

    from vllm_headinfer.tiny_model import build_tiny_model

    resident = resident_setting(args[0]) if args else "auto"
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

    settings = {"resident_kv_heads": resident, "cpu_kv_gib": 0.25}
    device_kv = DEVICE_KV_BYTES
    if current_platform.is_cuda():
        settings["staging_mib"] = CUDA_STAGING_MIB
        device_kv = (CUDA_STAGING_MIB << 20) + DEVICE_KV_BYTES // 2  # bf16: half the bytes
    hi, placement = generate(
        model,
        dtype,
        attention_backend="HEADINFER",
        kv_cache_memory_bytes=device_kv,
        additional_config={"headinfer": settings},
    )
    assert placement is not None, "HEADINFER did not place any head"
    print_placement(placement)
    print("\n=== HEADINFER output ===")
    for prompt, out in zip(PROMPTS, hi):
        print(f"{prompt[:50]!r:55} -> {out['text']!r}")

    base, _ = generate(model, dtype, kv_cache_memory_bytes=256 << 20)
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
