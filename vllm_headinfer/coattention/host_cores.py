"""The host's cores as CPU co-attention may use them: what the process's
affinity mask and its cgroup's CPU quota allow, shared by the ranks of
every replica on the host (split.rank_cores).

The quota counts: the kernel splits each call's pages between its threads
in equal parts and waits for the slowest, so threads beyond the quota are
throttled in turn and every call takes as long as the most throttled one.
The affinity mask alone is not enough: a container limited by ``cpu.max``
usually still sees every core of the host in its mask.

NUMA: threads and pool pages are not bound to a node. The pool is pinned
host memory that CUDA allocates, with no choice of node without libnuma's
mbind, and each request's pages are split over all the kernel's threads,
so node-local threads would need a per-node split of every request's
pages as well. On a host of several nodes the startup line says so, and
the way to node-local reads is to run the server on the GPU's node
(``numactl --cpunodebind=N --membind=N``): the affinity mask, and with it
the thread count, then follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
NODES_ONLINE = Path("/sys/devices/system/node/online")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """Cores this process's cgroup CPU quota allows (cgroup v2 ``cpu.max``,
    then v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None without a
    quota or where none can be read."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        if quota == "max":
            return None
        try:
            return int(quota) / int(period or 100_000)
        except ValueError:
            return None
    for folder in ("cpu", "cpu,cpuacct"):
        quota, period = (_read(root / folder / name) for name in ("cpu.cfs_quota_us",
                                                                   "cpu.cfs_period_us"))
        if quota is None or period is None:
            continue
        try:
            quota_us, period_us = int(quota), int(period)
        except ValueError:
            return None
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def numa_nodes(online: Path = NODES_ONLINE) -> int:
    """The host's online NUMA nodes (a list such as ``0-1,3``); 1 where the
    kernel does not say."""
    text = _read(online)
    if not text:
        return 1
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last) - int(first) + 1 if last else 1
    return max(1, count)


@dataclass(frozen=True)
class UsableCores:
    """Cores the process may keep busy, and why that many (for the startup
    line)."""

    cores: int
    why: str


def usable_cores(affinity: int, quota: float | None) -> UsableCores:
    """The cores of an affinity mask of ``affinity`` cores under a CPU
    quota of ``quota`` cores (None: none): whole cores only, a fraction
    being throttled time."""
    if quota is not None and quota < affinity:
        cores = max(1, math.floor(quota))
        return UsableCores(cores, f"a cgroup CPU quota of {quota:g} of the {affinity} cores "
                                  "in the affinity mask")
    return UsableCores(affinity, f"{affinity} cores in the affinity mask")


def ranks_on_host(ranks_per_node: int, local_replicas: int) -> int:
    """Ranks sharing this host's cores: each data-parallel replica on it
    runs ``ranks_per_node`` ranks."""
    return max(1, ranks_per_node) * max(1, local_replicas)
