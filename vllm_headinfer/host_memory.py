"""What the host has for the offloaded heads' KV: the RAM this process can
still get (under the container's cgroup limit) and how much of it a rank may
take at startup."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# Default host budget: this share of the RAM that is free at startup, split
# over the ranks of the node. The rest stays for weights, the OS and page cache.
DEFAULT_FREE_RAM_SHARE = 0.5
# At startup, refuse budgets above this share of free RAM, less a reserve per
# rank for the engine's own processes (CUDA context, libraries, buffers): each
# rank's pool is allocated only after its process has loaded the model. On the
# 125 GiB H100 host a 105.9 GiB pool with 124 GiB free got the engine killed
# while pinning; 90 GiB served (benchmarks/RESULTS.md).
HOST_SHARE_LIMIT = 0.8
HOST_RESERVE_PER_RANK_BYTES = 3 << 30


def ranks_per_node(vllm_config: VllmConfig) -> int:
    parallel = vllm_config.parallel_config
    return max(1, parallel.world_size // max(1, parallel.nnodes))


def _cgroup_free_bytes() -> int | None:
    """Memory left under this container's cgroup limit, which free RAM as the
    kernel reports it does not show (cgroup v2, then v1)."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            return int(limit) - usage
        return None
    return None


def available_host_bytes() -> int:
    """RAM this process can still get: the kernel's available memory, capped
    by the container's cgroup limit."""
    import psutil

    free = int(psutil.virtual_memory().available)
    cgroup = _cgroup_free_bytes()
    return free if cgroup is None else min(free, cgroup)


def host_limit_per_rank(free: int, ranks: int) -> int:
    """The largest cpu_kv_gib (in bytes) accepted at startup."""
    return max(0, int(free * HOST_SHARE_LIMIT - HOST_RESERVE_PER_RANK_BYTES * ranks) // ranks)
