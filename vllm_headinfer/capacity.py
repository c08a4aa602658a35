"""How many KV blocks fit: the smaller of the device and the host budget.

vLLM turns the device memory left after profiling into a block count. The
offloaded heads of every block also need host memory, so the usable count is
``min(device_budget // device_bytes_per_block, cpu_kv_bytes // host_bytes_per_block)``.
Expressing the host limit as an equivalent device budget lets vLLM's own
auto-fit, startup check, scheduler and capacity log use that number.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv

from vllm_headinfer.config import HeadInferConfig, HeadInferConfigError
from vllm_headinfer.spec import HeadInferAttentionSpec

logger = init_logger("vllm.headinfer")
GIB = 1 << 30


def headinfer_specs(worker_specs: dict) -> list[HeadInferAttentionSpec]:
    return [s for s in worker_specs.values() if isinstance(s, HeadInferAttentionSpec)]


def device_bytes_per_block(vllm_config, worker_specs: dict) -> int:
    """Device bytes of one block over all layers, as vLLM divides by."""
    import vllm.v1.core.kv_cache_utils as kcu

    groups = kcu.get_kv_cache_groups(vllm_config, copy.deepcopy(worker_specs))
    return kcu._pool_bytes_per_block(vllm_config, groups)


@dataclass
class HostBudget:
    """One rank's host-side limit on the KV block count."""

    cfg: HeadInferConfig
    host_bytes_per_block: int  # over all offloading layers of the rank
    block_size: int
    device_bytes_per_block: int = 0

    @property
    def num_blocks(self) -> int:
        return self.cfg.cpu_kv_bytes // self.host_bytes_per_block

    @property
    def max_tokens(self) -> int:
        # Block 0 is vLLM's null block and holds no tokens.
        return max(0, self.num_blocks - 1) * self.block_size

    def device_equivalent(self) -> int:
        """The device budget that yields exactly ``num_blocks`` blocks."""
        return self.num_blocks * self.device_bytes_per_block

    def check_max_model_len(self, vllm_config) -> None:
        model = vllm_config.model_config
        if model.original_max_model_len == -1:
            return  # auto-fit picks a length the host budget holds
        need = cdiv(model.max_model_len, self.block_size) + 1
        if need > self.num_blocks:
            raise HeadInferConfigError(
                f"HEADINFER: max_model_len={model.max_model_len} needs "
                f"{need * self.host_bytes_per_block / GIB:.3f} GiB of host memory "
                "per rank for the offloaded heads' KV, but "
                f"additional_config.headinfer.cpu_kv_gib={self.cfg.cpu_kv_gib} "
                f"holds {self.max_tokens} tokens. Raise cpu_kv_gib or lower "
                "--max-model-len (or pass --max-model-len auto)."
            )
        override = vllm_config.cache_config.num_gpu_blocks_override
        if override is not None and override > self.num_blocks:
            raise HeadInferConfigError(
                f"HEADINFER: num_gpu_blocks_override={override} exceeds the "
                f"{self.num_blocks} blocks that additional_config.headinfer."
                f"cpu_kv_gib={self.cfg.cpu_kv_gib} holds for offloaded heads."
            )


def host_budget(vllm_config, worker_specs: dict) -> HostBudget | None:
    """The host limit of one rank from its KV cache specs, or None when no
    layer offloads heads."""
    specs = [s for s in headinfer_specs(worker_specs) if s.num_offloaded_kv_heads]
    if not specs:
        return None
    return HostBudget(
        HeadInferConfig.from_vllm_config(vllm_config),
        sum(s.host_page_size_bytes for s in specs),
        specs[0].block_size,
        device_bytes_per_block(vllm_config, worker_specs),
    )


def model_host_budget(vllm_config, cfg: HeadInferConfig) -> HostBudget | None:
    """The same limit estimated from the model config alone, before any
    engine process starts, for a model whose every layer is HEADINFER's."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    heads = model.get_num_kv_heads(parallel)
    offloaded = heads - cfg.num_resident(heads)
    block_size = vllm_config.cache_config.block_size
    if not offloaded or not block_size:
        return None
    page = offloaded * block_size * 2 * model.get_head_size() * model.dtype.itemsize
    return HostBudget(cfg, model.get_num_layers(parallel) * page, block_size)


def log_placement(vllm_config, worker_specs: dict, num_blocks: int, budget: HostBudget | None):
    specs = headinfer_specs(worker_specs)
    spec = specs[0]
    dev = num_blocks * device_bytes_per_block(vllm_config, worker_specs)
    host = num_blocks * budget.host_bytes_per_block if budget else 0
    limit = "host (cpu_kv_gib)" if budget and num_blocks >= budget.num_blocks else "device"
    logger.info(
        "HEADINFER placement: %d/%d KV heads resident per layer and rank, "
        "%d offloaded, %d layers; device KV %.3f GiB, host KV %.3f GiB; "
        "capacity %d blocks = %d tokens (limited by %s)",
        spec.num_resident_kv_heads,
        spec.num_kv_heads,
        spec.num_offloaded_kv_heads,
        len(specs),
        dev / GIB,
        host / GIB,
        num_blocks,
        (num_blocks - 1) * spec.block_size,
        limit,
    )
