"""The config.json of real long-context checkpoints, shipped so that the
planner (``vllm-headinfer-plan --model-shape NAME``) and the benchmarks run
on real shapes without a model hub: vLLM reads a model's shape from its
config.json alone, and weights are not needed to plan (the planner counts
them from the config) or to time attention (``load_format="dummy"``).

Each folder holds the architecture, sizes, head counts, vocabulary, position
limit, RoPE settings and dtype of the checkpoint's own config.json; fields
that do not change the shape (token ids of chat templates, training
leftovers) are left out. Where each came from:

* ``llama-3-8b-1048k``: gradientai/Llama-3-8B-Instruct-Gradient-1048k, the
  model of the HeadInfer paper (Luo et al., arXiv 2502.12574): Llama-3-8B's
  shape (32 layers, 32 query and 8 KV heads of 128, vocabulary 128256) with
  RoPE theta 3580165449 and 1048576 positions, as its model card and
  config.json publish them. head_dim is derived (4096 / 32), as in the
  original file.
* ``qwen2.5-7b-1m``: Qwen/Qwen2.5-7B-Instruct-1M's config.json: 28 layers,
  28 query and 4 KV heads of 128, vocabulary 152064, RoPE theta 1e7,
  1010000 positions; its sliding window is declared but off
  (use_sliding_window false). The dual-chunk-attention variant
  (config_1m.json on its model card) is not shipped: vLLM serves that with
  its own attention backend, not HEADINFER.
* ``qwen3-30b-a3b-2507``: Qwen/Qwen3-30B-A3B-Instruct-2507, a mixture of
  experts: 48 layers, 32 query and 4 KV heads of 128, 128 experts of 768
  (8 per token), vocabulary 151936, RoPE theta 1e7, 262144 positions.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
# Shape name -> the checkpoint whose config.json it is.
CHECKPOINTS = {
    "llama-3-8b-1048k": "gradientai/Llama-3-8B-Instruct-Gradient-1048k",
    "qwen2.5-7b-1m": "Qwen/Qwen2.5-7B-Instruct-1M",
    "qwen3-30b-a3b-2507": "Qwen/Qwen3-30B-A3B-Instruct-2507",
}


def path(name: str) -> Path:
    """The folder holding the shape's config.json (a model path for vLLM)."""
    if name not in CHECKPOINTS:
        raise ValueError(
            f"unknown model shape {name!r}; shipped shapes: {', '.join(CHECKPOINTS)}")
    return HERE / name
