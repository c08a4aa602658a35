"""Planner: the placement HEADINFER would pick, before starting an engine.

    vllm-headinfer-plan (MODEL | --model-shape NAME) [engine flags]
        [--gpu-memory-gib G] [--link-gbps B | --measure] [--contexts 32768,131072]
    python -m vllm_headinfer.plan ...

Reads the model's config (a local path, the Hugging Face cache, or one of the
real checkpoints' configs shipped in vllm_headinfer/model_shapes) through
vLLM's own engine arguments (``-tp``, ``--gpu-memory-utilization``,
``--kv-cache-memory-bytes``, ``--max-model-len``, ``--kv-cache-dtype``,
``--block-size``, ``--additional-config``, ...), loads no weights and starts
no engine, and runs the engine's placement code (capacity.choose) on it.

The device KV budget is exact with ``--kv-cache-memory-bytes``. Otherwise it
is an estimate of what vLLM's memory profile will leave: GPU memory x
``--gpu-memory-utilization`` less the weights (their files' size, or a count
from the config) and ACTIVATION_RESERVE; the engine decides with the real
figure, and the output says which it used. Planning a GPU from a machine
without one, the engine flags left unset take CUDA's defaults, not this
machine's (the CPU platform's 128-token blocks).

Decode time is predicted as link-bound: the offloaded KV of the context
crosses the link once per step at ``--link-gbps`` (default: an assumed rate,
what an H100 on PCIe Gen5 read over UVA), or at the rate ``--measure`` reads
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
# 49.5-50.5 GB/s (benchmarks/RESULTS.md). Assumed unless --measure or
# --link-gbps says otherwise.
DEFAULT_LINK_GBPS = 50.0
ASSUMED_LINK = "assumed: an H100 on PCIe Gen5 reading pinned host memory; --measure times yours"
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
    embed = hf.vocab_size * hidden * (1 if getattr(hf, "tie_word_embeddings", False) else 2)
    per_layer = hidden * (2 * q + 2 * kv) + mlp_params(hf) + 2 * hidden
    return (embed + layers * per_layer) * model_config.dtype.itemsize


def mlp_params(hf) -> int:
    """One layer's gated MLP, or its experts and router in a mixture of
    experts (Qwen-MoE and Mixtral name their sizes differently)."""
    hidden = hf.hidden_size
    experts = getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None)
    if experts:
        inter = getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size
        return experts * 3 * hidden * inter + hidden * experts
    return 3 * hidden * getattr(hf, "intermediate_size", 4 * hidden)


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
           contexts, model_name: str, on_gpu: bool) -> str:
    from vllm_headinfer.capacity import describe_heads, link_wording

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
    out = [
        f"model {model_name}: {kv.num_layers} layers x {kv.num_kv_heads} KV heads per rank "
        f"(tensor parallel {vllm_config.parallel_config.tensor_parallel_size}), "
        f"{kv.head_block_bytes * kv.head_layers // kv.block_size} KV bytes per token per rank",
        f"device KV budget per rank: {size(budgets.device_bytes)} ({dev.how})",
        f"host KV budget per rank (cpu_kv_gib): {size(budgets.host_bytes)}",
        f"link: {link_gbps:.1f} GB/s ({link_how}); decode times are link-bound predictions",
        "",
        line(head),
        *(line(r) for r in table),
        "",
        f"startup line: HEADINFER placement: {chosen.summary(link_wording(on_gpu))}",
        f"next line:    HEADINFER heads per rank: {describe_heads(chosen, on_gpu)}",
    ]
    if not dev.exact:
        out.append(
            "The device budget is an estimate: the engine places heads with the "
            "budget vLLM's memory profile measures, so its figures can differ."
        )
    return "\n".join(out)


def planner_flags():
    """The planner's own flags: (flag, argparse keywords)."""
    from vllm_headinfer import model_shapes

    return (
        ("--model-shape", dict(
            choices=list(model_shapes.CHECKPOINTS), default=None,
            help="plan a shipped real checkpoint's shape instead of MODEL: "
            + ", ".join(f"{k} ({v})" for k, v in model_shapes.CHECKPOINTS.items()))),
        ("--gpu-memory-gib", dict(
            type=float, default=None,
            help="the GPU's memory in GiB, to plan a GPU from a machine without it "
            "(unset engine flags then take CUDA's defaults)")),
        ("--link-gbps", dict(
            type=float, default=None,
            help=f"host-to-GPU read rate in GB/s (default {DEFAULT_LINK_GBPS}, assumed)")),
        ("--measure", dict(
            action="store_true", help="measure the UVA read rate on this machine's GPU")),
        ("--contexts", dict(
            default=",".join(map(str, DEFAULT_CONTEXTS)),
            help="comma-separated context lengths to predict decode times for")),
    )


PROG = "vllm-headinfer-plan"
DESCRIPTION = ("Print the KV head placement HEADINFER picks for a model, "
               "without loading weights or starting an engine.")
ENGINE_FLAGS = ("It also takes vLLM's engine flags (-tp, --gpu-memory-utilization, "
                "--kv-cache-memory-bytes, --max-model-len, --kv-cache-dtype, "
                "--block-size, --additional-config, ...)")


def add_planner_arguments(parser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None,
                        help="model path or name (or use --model-shape)")
    planner = parser.add_argument_group("planner")
    for flag, kw in planner_flags():
        planner.add_argument(flag, **kw)


def print_plain_help() -> None:
    """Plain ``--help`` without importing vLLM (about 10 s of imports, and
    its parser would list every engine flag in the usage line): the
    planner's flags, and where vLLM's engine flags are described."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION,
        usage=f"{PROG} (MODEL | --model-shape NAME) [planner flags] [vLLM engine flags]",
        epilog=f"{ENGINE_FLAGS}; --help=GROUP or --help=FLAG describes them as "
        "`vllm serve` does (e.g. --help=CacheConfig, --help=max-model-len).")
    add_planner_arguments(parser)
    parser.print_help()


def wants_plain_help(argv: list[str]) -> bool:
    """Plain -h/--help; --help=GROUP (or =FLAG) is vLLM's parser's."""
    return "-h" in argv or "--help" in argv


def parse(argv: list[str]):
    if wants_plain_help(argv):
        print_plain_help()
        sys.exit(0)
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_headinfer import model_shapes

    parser = FlexibleArgumentParser(prog=PROG, description=f"{DESCRIPTION} {ENGINE_FLAGS}.")
    add_planner_arguments(parser)
    parser = EngineArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    if (args.model_tag is None) == (args.model_shape is None):
        parser.error("give a model path or name, or --model-shape NAME (one of: "
                     f"{', '.join(model_shapes.CHECKPOINTS)}), not both")
    if args.model_shape is not None:
        args.model_tag = str(model_shapes.path(args.model_shape))
    args.model = args.model_tag
    if args.attention_backend is None:
        args.attention_backend = "HEADINFER"
    if plans_gpu_elsewhere(args):
        cuda_defaults(args)
    return args, EngineArgs.from_cli_args(args)


def plans_gpu_elsewhere(args) -> bool:
    """A GPU planned from a machine whose platform is not CUDA."""
    from vllm.platforms import current_platform

    return args.gpu_memory_gib is not None and not current_platform.is_cuda()


def cuda_defaults(args) -> None:
    """Engine flags left unset take what vLLM picks on CUDA, where this
    machine's platform would pick its own (the CPU platform's blocks are 128
    tokens, CUDA's 16)."""
    from vllm.config import CacheConfig

    if args.block_size is None:
        args.block_size = CacheConfig.DEFAULT_BLOCK_SIZE


def shown_name(args) -> str:
    from vllm_headinfer import model_shapes

    if args.model_shape is None:
        return args.model_tag
    return f"{model_shapes.CHECKPOINTS[args.model_shape]} (shape {args.model_shape}, shipped)"


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
    from vllm.platforms import current_platform

    # Planning a GPU: this machine's, or one --gpu-memory-gib describes.
    gpu = args.gpu_memory_gib is not None or current_platform.is_cuda()
    staging = cfg.staging_bytes if gpu else offload_device_bytes(cfg)
    budgets = policy.Budgets(dev.bytes, cfg.cpu_kv_bytes, staging)
    if args.measure:
        link, how = measure_link_gbps(), "measured here over UVA"
    elif args.link_gbps is not None:
        link, how = args.link_gbps, "given"
    else:
        link, how = DEFAULT_LINK_GBPS, ASSUMED_LINK
    contexts = [int(c) for c in args.contexts.split(",") if c]
    try:
        print(render(vllm_config, cfg, kv, budgets, dev, link, how, contexts, shown_name(args), gpu))
    except HeadInferConfigError as e:
        print(f"refused at startup: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
