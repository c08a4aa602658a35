"""The placement of each rank, decided in the engine core, and what it holds.

Workers report every HEADINFER layer with all its heads resident (see
spec.py). vLLM's engine core then knows each worker's device KV budget from
profiling and calls ``get_kv_cache_configs``; the patch in
``patches/kv_cache_sizing.py`` (vllm_headinfer.patches) runs ``place_workers`` there, once for all
ranks: the placement policy (placement.py) picks the resident heads of every
layer, each layer's spec is replaced by its head split, and the budget is
clamped to the blocks the host pool holds. vLLM's own auto-fit, max-length
check, block planning and capacity log then see the real capacity, and the
specs travel to every worker inside the KV cache config, where each layer's
metadata builder adopts its split (metadata.py).
"""

from __future__ import annotations

import copy
from dataclasses import replace

from vllm.logger import init_logger

from vllm_headinfer import placement as policy
from vllm_headinfer.config import HeadInferConfig, HeadInferConfigError
from vllm_headinfer.spec import HeadInferAttentionSpec, placeholder_page_bytes, split_spec
from vllm_headinfer.vllm_support import kv_planning

logger = init_logger("vllm.headinfer.capacity")
GIB = 1 << 30


def headinfer_specs(worker_specs: dict) -> dict[str, HeadInferAttentionSpec]:
    return {n: s for n, s in worker_specs.items() if isinstance(s, HeadInferAttentionSpec)}


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def placed_specs(vllm_config, worker_specs: dict) -> dict[str, HeadInferAttentionSpec]:
    """The HEADINFER layers whose heads are placed: the target model's.

    A drafter's attention layers (speculative ``draft_model``) are small and
    read at every draft step, so they keep every head on the device. vLLM
    0.34's model runner marks them (``KVCacheSpec.is_draft``); elsewhere they
    are the layers registered after every target layer."""
    ours = headinfer_specs(worker_specs)
    if vllm_config.speculative_config is None:
        return ours
    if any(getattr(s, "is_draft", False) for s in ours.values()):
        return {n: s for n, s in ours.items() if not s.is_draft}
    target = set(list(worker_specs)[: vllm_config.model_config.get_num_layers(
        vllm_config.parallel_config
    )])
    return {n: s for n, s in ours.items() if n in target}


def rank_kv(vllm_config, worker_specs: dict) -> policy.RankKV | None:
    """The KV shape of one worker's placed layers, or None if it has none."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    ours = placed_specs(vllm_config, worker_specs)
    if not ours:
        return None
    spec = next(iter(ours.values()))
    if len({(s.num_kv_heads, s.page_size_bytes) for s in ours.values()}) > 1:
        raise HeadInferConfigError(
            "HEADINFER needs the same KV heads and head size in every layer it "
            "serves; this model's layers differ. Use the default backend."
        )
    others = {n: s for n, s in worker_specs.items() if n not in ours}
    return kv_shape(
        spec,
        tuple(sorted(layer_index(n) for n in ours)),
        other_device_bytes=sum(s.page_size_bytes for s in others.values()),
        # Layers of another attention type form other KV cache groups.
        uniform_only=any(not isinstance(s, FullAttentionSpec) for s in others.values()),
    )


def kv_shape(spec, layer_indices: tuple[int, ...], **extra) -> policy.RankKV:
    """The policy's view of layers shaped like ``spec`` (all heads resident)."""
    return policy.RankKV(
        layer_indices=layer_indices,
        num_kv_heads=spec.num_kv_heads,
        block_size=spec.block_size,
        head_block_bytes=spec.page_size_bytes // spec.num_kv_heads,
        placeholder_bytes=placeholder_page_bytes(spec),
        **extra,
    )


def offload_device_bytes(cfg: HeadInferConfig) -> int:
    """Device memory the offload path needs besides KV: the staging buffers,
    allocated only where some head is offloaded and a path stages."""
    from vllm.platforms import current_platform

    return cfg.staging_bytes if current_platform.is_cuda() else 0


def pool_target(vllm_config, cfg: HeadInferConfig, block_size: int) -> int | None:
    """Tokens the auto placement must hold, None for the largest pool."""
    override = vllm_config.cache_config.num_gpu_blocks_override
    if override is not None:
        return (override - 1) * block_size
    if cfg.kv_pool_tokens == "max":
        return None
    if cfg.kv_pool_tokens is not None:
        return cfg.kv_pool_tokens
    if vllm_config.model_config.original_max_model_len == -1:
        return None  # --max-model-len auto: the largest pool
    return vllm_config.model_config.max_model_len


def choose(
    vllm_config, cfg: HeadInferConfig, kvs: list[policy.RankKV], budgets: list[policy.Budgets]
) -> list[policy.Placement]:
    """One placement per rank (ranks share block ids, so one pool size)."""
    if not cfg.is_auto:
        placements = [
            policy.fixed(kv, tuple(cfg.resident_of(i, kv.num_kv_heads) for i in kv.layer_indices), b)
            for kv, b in zip(kvs, budgets)
        ]
        if any(p.kv.uniform_only and len(set(p.counts)) > 1 for p in placements):
            raise HeadInferConfigError(
                "additional_config.headinfer.resident_kv_heads: this model has "
                "layers of other attention kinds, so HEADINFER's layers need one "
                "resident count for all (an integer 0..H)."
            )
        for p in placements:
            check_host_holds(vllm_config, cfg, p)
        return placements
    tokens = pool_target(vllm_config, cfg, kvs[0].block_size)
    try:
        if tokens is None:
            tokens = (policy.max_blocks(kvs, budgets) - 1) * kvs[0].block_size
        return [policy.auto(kv, b, tokens) for kv, b in zip(kvs, budgets)]
    except policy.PlacementError as e:
        asked = (
            f"={cfg.kv_pool_tokens!r}" if cfg.kv_pool_tokens is not None
            else f" (not set: max_model_len={vllm_config.model_config.max_model_len})"
        )
        raise HeadInferConfigError(
            f"HEADINFER: {e}. additional_config.headinfer.kv_pool_tokens{asked} "
            "asks for more than fits: "
            "raise cpu_kv_gib or the device KV budget (--gpu-memory-utilization, "
            "--kv-cache-memory-bytes), or lower kv_pool_tokens / --max-model-len "
            "(or pass kv_pool_tokens 'max' / --max-model-len auto)."
        ) from None


def check_host_holds(vllm_config, cfg: HeadInferConfig, p: policy.Placement) -> None:
    """Explicit counts: refuses what ``cpu_kv_gib`` cannot hold."""
    host_bpb = p.host_bytes_per_block
    if not host_bpb:
        return
    host_blocks = cfg.cpu_kv_bytes // host_bpb
    model = vllm_config.model_config
    block_size = p.kv.block_size
    if model.original_max_model_len != -1:
        need = policy.pool_blocks(model.max_model_len, block_size)
        if need > host_blocks:
            raise HeadInferConfigError(
                f"HEADINFER: max_model_len={model.max_model_len} needs "
                f"{need * host_bpb / GIB:.3f} GiB of host memory per rank for the "
                "offloaded heads' KV, but "
                f"additional_config.headinfer.cpu_kv_gib={cfg.cpu_kv_gib} holds "
                f"{max(0, host_blocks - 1) * block_size} tokens. Raise cpu_kv_gib "
                "or lower --max-model-len (or pass --max-model-len auto)."
            )
    override = vllm_config.cache_config.num_gpu_blocks_override
    if override is not None and override > host_blocks:
        raise HeadInferConfigError(
            f"HEADINFER: num_gpu_blocks_override={override} exceeds the "
            f"{host_blocks} blocks that additional_config.headinfer."
            f"cpu_kv_gib={cfg.cpu_kv_gib} holds for offloaded heads."
        )


def apply(vllm_config, worker_specs: dict, p: policy.Placement) -> dict:
    """The worker's specs with each placed layer split as placed."""
    out = dict(worker_specs)
    for name, spec in placed_specs(vllm_config, worker_specs).items():
        out[name] = split_spec(spec, p.resident_of(layer_index(name)))
    return out


def place_workers(vllm_config, kv_cache_specs: list[dict], available_memory: list[int]):
    """Decides every rank's placement; returns the re-split specs, the
    budgets clamped to what the host pools hold, and the placements.

    Ranks that hold the same layers (tensor parallel) must split them alike
    (vLLM requires one spec per layer across workers): they are placed once,
    with the smallest of their device budgets."""
    cfg = HeadInferConfig.from_vllm_config(vllm_config)
    ranks = [i for i, specs in enumerate(kv_cache_specs) if headinfer_specs(specs)]
    by_layers: dict[tuple, list[int]] = {}
    for i in ranks:
        by_layers.setdefault(tuple(sorted(placed_specs(vllm_config, kv_cache_specs[i]))), []).append(i)
    groups = list(by_layers.values())
    kvs = [rank_kv(vllm_config, kv_cache_specs[g[0]]) for g in groups]
    offload = offload_device_bytes(cfg)
    budgets = [
        policy.Budgets(min(available_memory[i] for i in g), cfg.cpu_kv_bytes, offload)
        for g in groups
    ]
    chosen = choose(vllm_config, cfg, kvs, budgets)
    specs, avail, by_rank = list(kv_cache_specs), list(available_memory), {}
    for group, p in zip(groups, chosen):
        for i in group:
            specs[i] = apply(vllm_config, kv_cache_specs[i], p)
            by_rank[i] = p
            if p.offloads:
                # vLLM's own bytes per block, and host bytes per block of the
                # specs as vLLM groups them (with layers of other kinds it
                # may enlarge a group's blocks to equalise pages).
                dev_bpb, host_bpb = bytes_per_block(vllm_config, specs[i])
                host_blocks = cfg.cpu_kv_bytes // host_bpb
                avail[i] = min(avail[i] - offload, host_blocks * dev_bpb)
    return specs, avail, by_rank


def bytes_per_block(vllm_config, worker_specs: dict) -> tuple[int, int]:
    """Device and host bytes of one block as vLLM groups these specs."""
    from vllm.v1.kv_cache_interface import iter_layer_specs

    planning = kv_planning()
    groups = planning.groups(vllm_config, copy.deepcopy(worker_specs))
    host = 0
    for group in groups:
        layer_specs = iter_layer_specs(group.kv_cache_spec)
        if len(layer_specs) == 1:  # one spec for all of the group's layers
            layer_specs = list(layer_specs) * len(group.layer_names)
        host += sum(
            s.host_page_size_bytes for s in layer_specs if isinstance(s, HeadInferAttentionSpec)
        )
    return planning.pool_bytes_per_block(vllm_config, groups), host


def log_placement(vllm_config, p: policy.Placement, kv_cache_config) -> policy.Placement:
    """Logs the startup line for vLLM's final KV cache config; returns the
    placement with its block count, block size and what bounds it."""
    from vllm.v1.kv_cache_interface import iter_layer_specs

    cfg = HeadInferConfig.from_vllm_config(vllm_config)
    num_blocks = kv_cache_config.num_blocks
    block_size = next(
        s.block_size
        for g in kv_cache_config.kv_cache_groups
        for s in iter_layer_specs(g.kv_cache_spec)
        if isinstance(s, HeadInferAttentionSpec)
    )
    # vLLM may have enlarged the group's blocks (layers of other kinds), and
    # its bytes per block are what the device holds: the line shows those.
    scale = block_size // p.kv.block_size
    kv = replace(
        p.kv, block_size=block_size, head_block_bytes=p.kv.head_block_bytes * scale,
        placeholder_bytes=p.kv.placeholder_bytes * scale, other_device_bytes=0,
    )
    device_bpb = kv_planning().pool_bytes_per_block(vllm_config, kv_cache_config.kv_cache_groups)
    kv = replace(kv, other_device_bytes=max(0, device_bpb - kv.device_bytes_per_block(p.counts)))
    p = replace(p, kv=kv)
    if p.offloads and num_blocks >= cfg.cpu_kv_bytes // p.host_bytes_per_block:
        limited = "host (cpu_kv_gib)"
    elif vllm_config.cache_config.num_gpu_blocks_override is not None:
        limited = "num_gpu_blocks_override"
    else:
        limited = "device"
    final = replace(p, num_blocks=num_blocks, limited_by=limited)
    from vllm.platforms import current_platform

    on_gpu = current_platform.is_cuda()
    logger.info("HEADINFER placement: %s", final.summary(link_wording(on_gpu)))
    logger.info("HEADINFER heads per rank: %s", describe_heads(final, on_gpu))
    return final


def link_wording(on_gpu: bool) -> str:
    """Where decode steps read offloaded heads from: over PCIe on a GPU; on
    CPU both parts are RAM, so there is no link to name."""
    return "over the link" if on_gpu else "from the host pool"


def describe_heads(p: policy.Placement, on_gpu: bool) -> str:
    """Which KV heads of each layer sit where, in runs of layers, e.g.
    ``layers 0-19: heads 0-6 on the GPU, head 7 in host RAM; layers 20-31: ...``.
    A layer keeps its first ``count`` heads resident (spec.split_spec)."""
    device, host = ("on the GPU", "in host RAM") if on_gpu else (
        "in vLLM's KV cache", "in the host pool")
    heads = p.kv.num_kv_heads

    def named(noun: str, first: int, last: int) -> str:
        return f"{noun} {first}" if first == last else f"{noun}s {first}-{last}"

    def where(count: int) -> str:
        parts = [f"{named('head', 0, count - 1)} {device}"] if count else []
        if count < heads:
            parts.append(f"{named('head', count, heads - 1)} {host}")
        return ", ".join(parts)

    return "; ".join(
        f"{named('layer', first, last)}: {where(count)}"
        for count, first, last in policy.layer_runs(p.kv.layer_indices, p.counts)
    )


def model_rank_kv(vllm_config) -> policy.RankKV:
    """The KV shape of one rank from the model config alone (every layer
    HEADINFER's), before any engine process starts."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    model, parallel, cache = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    # vLLM's storage dtype: one byte per element for fp8 caches.
    dtype = kv_cache_dtype_str_to_dtype(cache.cache_dtype, model)
    spec = FullAttentionSpec(
        block_size=cache.block_size,
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_size=model.get_head_size(),
        dtype=dtype,
    )
    start, end = model.get_layers_start_end_indices(parallel)
    return kv_shape(spec, tuple(range(start, end)))


def check_before_engine(vllm_config, cfg: HeadInferConfig) -> None:
    """In the user's process: refuses what the budgets known before any
    engine starts cannot hold (the host budget always; the device budget
    when --kv-cache-memory-bytes gives it)."""
    if not vllm_config.cache_config.block_size:
        return
    kv = model_rank_kv(vllm_config)
    device = vllm_config.cache_config.kv_cache_memory_bytes
    if not cfg.is_auto:
        counts = tuple(cfg.resident_of(i, kv.num_kv_heads) for i in kv.layer_indices)
        unlimited = policy.Budgets(1 << 62, cfg.cpu_kv_bytes)
        check_host_holds(vllm_config, cfg, policy.fixed(kv, counts, unlimited))
    elif device is not None:
        choose(vllm_config, cfg, [kv], [policy.Budgets(device, cfg.cpu_kv_bytes, offload_device_bytes(cfg))])
