"""Planner: the placement HEADINFER would pick, before starting an engine.

    python -m vllm_headinfer.plan MODEL [engine flags] [--gpu-memory-gib G]
        [--link-gbps B | --measure] [--contexts 32768,131072]
    vllm-headinfer-plan MODEL ...

Reads the model's config (a local path, or the Hugging Face cache) through
vLLM's own engine arguments (``-tp``, ``--gpu-memory-utilization``,
``--kv-cache-memory-bytes``, ``--max-model-len``, ``--kv-cache-dtype``,
``--block-size``, ``--additional-config``, ...), loads no weights and starts
no engine, and runs the engine's placement code (capacity.choose) on it.

The device KV budget is exact with ``--kv-cache-memory-bytes``. Otherwise it
is an estimate of what vLLM's memory profile will leave: GPU memory x
``--gpu-memory-utilization`` less the weights (their files' size, or a count
from the config) and ACTIVATION_RESERVE; the engine decides with the real
figure, and the output says which it used.

Decode time is predicted as link-bound: the offloaded KV of the context
crosses the link once per step at ``--link-gbps`` (default: the UVA read rate
measured on an H100 with PCIe Gen5), or at the rate ``--measure`` reads
pinned host memory over UVA on this machine's GPU.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from dataclasses import dataclass

from vllm_headinfer import placement as policy

GIB = 1 << 30
# Decode reads of pinned host memory over UVA on the H100 host (PCIe Gen5):
# 49.5-50.5 GB/s (benchmarks/RESULTS.md).
DEFAULT_LINK_GBPS = 50.0
# Device memory vLLM's profile keeps besides weights and KV at
# gpu_memory_utilization=0.9 for the Llama-3-8B shape on the H100 (activations,
# CUDA graphs, allocator slack): 0.9 x 79.2 GiB - 15.0 GiB weights - 52.6 GiB
# KV measured (benchmarks/RESULTS.md).
ACTIVATION_RESERVE = 3.7 * GIB
DEFAULT_CONTEXTS = (32768, 131072, 524288, 1048576)


@dataclass
class DeviceBudget:
    bytes: int
    how: str  # what it is made of, printed with the table
    exact: bool


def weights_bytes(model_config) -> int:
    """The checkpoint's size on disk where it is local, else a count of a
    decoder's parameters from its config."""
    path = model_config.model
    files = glob.glob(os.path.join(path, "*.safetensors")) if os.path.isdir(path) else []
    if files:
        return sum(os.path.getsize(f) for f in files)
    hf = model_config.hf_text_config
    hidden, layers = hf.hidden_size, hf.num_hidden_layers
    head = model_config.get_head_size()
    q = hf.num_attention_heads * head
    kv = model_config.get_total_num_kv_heads() * head
    inter = getattr(hf, "intermediate_size", 4 * hidden)
    embed = hf.vocab_size * hidden * (1 if getattr(hf, "tie_word_embeddings", False) else 2)
    per_layer = hidden * (2 * q + 2 * kv) + 3 * hidden * inter + 2 * hidden
    return (embed + layers * per_layer) * model_config.dtype.itemsize


def device_budget(vllm_config, gpu_memory_gib: float | None) -> DeviceBudget:
    cache = vllm_config.cache_config
    if cache.kv_cache_memory_bytes is not None:
        return DeviceBudget(cache.kv_cache_memory_bytes, "--kv-cache-memory-bytes", True)
    if gpu_memory_gib is None:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(
                "plan: no GPU here: pass --gpu-memory-gib (the GPU's memory) or "
                "--kv-cache-memory-bytes (the device KV budget)."
            )
        gpu_memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    tp = vllm_config.parallel_config.tensor_parallel_size
    pp = vllm_config.parallel_config.pipeline_parallel_size
    util = cache.gpu_memory_utilization
    weights = weights_bytes(vllm_config.model_config) / (tp * pp)
    budget = int(gpu_memory_gib * GIB * util - weights - ACTIVATION_RESERVE)
    how = (
        f"estimate: {gpu_memory_gib:.1f} GiB x {util} - {weights / GIB:.2f} GiB weights "
        f"- {ACTIVATION_RESERVE / GIB:.1f} GiB activations (the engine measures it)"
    )
    return DeviceBudget(max(0, budget), how, False)


def measure_link_gbps(nbytes: int = 2 * GIB) -> float:
    """GB/s at which this GPU reads pinned host memory in place (UVA)."""
    import torch
    from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

    host = torch.ones(nbytes // 4, dtype=torch.float32).pin_memory()
    view = get_accelerator_view_from_cpu_tensor(host)
    view.sum()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        view.sum()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def size(nbytes: int) -> str:
    return policy.size(nbytes) if nbytes else "0"


def rows(vllm_config, cfg, kv: policy.RankKV, budgets: policy.Budgets):
    """The chosen placement, the largest pool, and the two ends."""
    from vllm_headinfer.capacity import choose

    chosen = choose(vllm_config, cfg, [kv], [budgets])[0]
    label = "auto" if cfg.is_auto else "resident_kv_heads"
    yield label, chosen
    if cfg.is_auto:
        yield "auto, largest pool (kv_pool_tokens 'max')", policy.auto(kv, budgets, None)
    everything = (kv.num_kv_heads,) * kv.num_layers
    yield "all resident (default backend)", policy.fixed(kv, everything, budgets)
    yield "none resident (R=0)", policy.fixed(kv, (0,) * kv.num_layers, budgets)


def render(vllm_config, cfg, kv, budgets, dev: DeviceBudget, link_gbps: float, link_how: str,
           contexts) -> str:
    head = ["placement", "resident", "device KV", "host KV", "pool tokens", "limited by"]
    head += [f"decode @{c // 1024}K" for c in contexts]
    table = []
    chosen = None
    for label, p in rows(vllm_config, cfg, kv, budgets):
        chosen = chosen or p
        cells = [
            label,
            f"{p.resident_head_layers}/{kv.head_layers}",
            size(p.num_blocks * p.device_bytes_per_block),
            size(p.num_blocks * p.host_bytes_per_block),
            f"{p.tokens:,}",
            p.limited_by,
        ]
        for c in contexts:
            seconds = c * p.link_bytes_per_token() / (link_gbps * 1e9)
            cells.append("-" if c > p.tokens else f"{seconds:.3f} s")
        table.append(cells)
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    model = vllm_config.model_config
    out = [
        f"model {model.model}: {kv.num_layers} layers x {kv.num_kv_heads} KV heads per rank "
        f"(tensor parallel {vllm_config.parallel_config.tensor_parallel_size}), "
        f"{kv.head_block_bytes * kv.head_layers // kv.block_size} KV bytes per token per rank",
        f"device KV budget per rank: {size(budgets.device_bytes)} ({dev.how})",
        f"host KV budget per rank (cpu_kv_gib): {size(budgets.host_bytes)}",
        f"link: {link_gbps:.1f} GB/s ({link_how}); decode times are link-bound predictions",
        "",
        line(head),
        *(line(r) for r in table),
        "",
        f"startup line: HEADINFER placement: {chosen.summary()}",
    ]
    if not dev.exact:
        out.append(
            "The device budget is an estimate: the engine places heads with the "
            "budget vLLM's memory profile measures, so its figures can differ."
        )
    return "\n".join(out)


def parse(argv: list[str]):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="vllm-headinfer-plan",
        description="Print the KV head placement HEADINFER picks for a model.",
    )
    parser.add_argument("model_tag", help="model path or name")
    planner = parser.add_argument_group("planner")
    planner.add_argument("--gpu-memory-gib", type=float, default=None,
                         help="GPU memory when planning on a machine without it")
    planner.add_argument("--link-gbps", type=float, default=None,
                         help=f"host-to-GPU read rate (default {DEFAULT_LINK_GBPS})")
    planner.add_argument("--measure", action="store_true",
                         help="measure the UVA read rate on this machine's GPU")
    planner.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)),
                         help="comma-separated context lengths for decode times")
    parser = EngineArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    args.model = args.model_tag
    if args.attention_backend is None:
        args.attention_backend = "HEADINFER"
    return args, EngineArgs.from_cli_args(args)


def main(argv: list[str] | None = None) -> int:
    args, engine_args = parse(sys.argv[1:] if argv is None else argv)
    from vllm_headinfer.capacity import model_rank_kv, offload_device_bytes
    from vllm_headinfer.config import HeadInferConfig, HeadInferConfigError
    from vllm_headinfer.startup import planning_elsewhere

    try:
        with planning_elsewhere():
            vllm_config = engine_args.create_engine_config()
    except HeadInferConfigError as e:
        print(f"refused at startup: {e}", file=sys.stderr)
        return 2
    cfg = HeadInferConfig.from_vllm_config(vllm_config)
    kv = model_rank_kv(vllm_config)
    dev = device_budget(vllm_config, args.gpu_memory_gib)
    gpu = args.gpu_memory_gib is not None or dev.how != "--kv-cache-memory-bytes"
    staging = cfg.staging_bytes if gpu else offload_device_bytes(cfg)
    budgets = policy.Budgets(dev.bytes, cfg.cpu_kv_bytes, staging)
    if args.measure:
        link, how = measure_link_gbps(), "measured here over UVA"
    elif args.link_gbps is not None:
        link, how = args.link_gbps, "given"
    else:
        link, how = DEFAULT_LINK_GBPS, "H100 PCIe Gen5 UVA reads, measured"
    contexts = [int(c) for c in args.contexts.split(",") if c]
    try:
        print(render(vllm_config, cfg, kv, budgets, dev, link, how, contexts))
    except HeadInferConfigError as e:
        print(f"refused at startup: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
