"""The cores CPU co-attention's threads may use (coattention/host_cores.py), from fake
cgroup and NUMA files: a CPU quota below the affinity mask bounds them (v2
``cpu.max``, v1 ``cpu.cfs_quota_us``), whole cores only, shared by the
ranks of every data-parallel replica on the host."""

from __future__ import annotations

from types import SimpleNamespace

from vllm_headinfer.coattention import share as coattention_share
from vllm_headinfer.coattention.host_cores import (
    cgroup_cpu_quota,
    numa_nodes,
    ranks_on_host,
    usable_cores,
)
from vllm_headinfer.coattention.split import RankSplit, kernel_threads, rank_cores, startup_line
from vllm_headinfer.config import HeadInferConfig


def write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def test_cgroup_quota_v2_and_v1(tmp_path):
    assert cgroup_cpu_quota(write(tmp_path / "a", {"cpu.max": "max 100000"})) is None
    assert cgroup_cpu_quota(write(tmp_path / "b", {"cpu.max": "250000 100000"})) == 2.5
    assert cgroup_cpu_quota(write(tmp_path / "c", {"cpu/cpu.cfs_quota_us": "-1",
                                                   "cpu/cpu.cfs_period_us": "100000"})) is None
    assert cgroup_cpu_quota(write(tmp_path / "d", {"cpu,cpuacct/cpu.cfs_quota_us": "400000",
                                                   "cpu,cpuacct/cpu.cfs_period_us": "100000"})) == 4
    assert cgroup_cpu_quota(tmp_path / "none") is None


def test_numa_nodes(tmp_path):
    assert numa_nodes(write(tmp_path, {"one": "0"}) / "one") == 1
    assert numa_nodes(write(tmp_path, {"two": "0-1"}) / "two") == 2
    assert numa_nodes(write(tmp_path, {"gaps": "0-1,3"}) / "gaps") == 3
    assert numa_nodes(tmp_path / "missing") == 1


def test_threads_follow_the_quota_and_the_ranks_on_the_host():
    # No quota: the affinity mask.
    assert usable_cores(16, None).cores == 16
    # A quota of 6.5 cores in a 64-core mask: 6 whole cores (a thread on the
    # seventh would be throttled, and every call waits for its slowest thread).
    usable = usable_cores(64, 6.5)
    assert usable.cores == 6 and "quota of 6.5 of the 64 cores" in usable.why
    assert usable_cores(64, 0.5).cores == 1
    assert usable_cores(4, 8.0).cores == 4  # a quota above the mask changes nothing
    # Two replicas of two ranks each share a 32-core host: 8 cores, 7 threads a rank.
    ranks = ranks_on_host(2, 2)
    assert ranks == 4 and rank_cores(usable_cores(32, None).cores, ranks) == 8
    assert kernel_threads(rank_cores(32, ranks)) == 7
    assert ranks_on_host(1, 0) == 1


def test_startup_line_says_why_so_many_threads():
    split = RankSplit(threads=5, fixed=1,
                      threads_why="6 core(s) for this rank from a cgroup CPU quota")
    assert startup_line(split, [0], [2]) == (
        "CPU threads attend 1/2 offloaded KV head-layers per rank (1 in layer 0), 5 thread(s) "
        "(6 core(s) for this rank from a cgroup CPU quota); fixed by cpu_attention")


def test_a_rank_s_cores_under_a_quota_with_two_replicas(monkeypatch):
    monkeypatch.setattr(coattention_share.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(coattention_share, "cgroup_cpu_quota", lambda: 16.0)
    config = SimpleNamespace(parallel_config=SimpleNamespace(
        world_size=2, nnodes=1, data_parallel_size_local=2))
    cores, why = coattention_share.rank_cores_why(config)
    assert cores == 4
    assert why == ("a cgroup CPU quota of 16 of the 64 cores in the affinity mask, shared by 4 "
                   "ranks on this host")


def test_the_rank_s_split_says_why_so_many_threads_on_a_two_node_host(monkeypatch):
    monkeypatch.setattr(coattention_share.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(coattention_share, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(coattention_share, "numa_nodes", lambda: 2)
    config = SimpleNamespace(parallel_config=SimpleNamespace(
        world_size=1, nnodes=1, data_parallel_size_local=1))
    split = coattention_share.rank_split(config, HeadInferConfig.parse({"cpu_attention": 2}),
                                         spec=None)
    assert split.threads == 7 and split.threads_why == (
        "8 core(s) for this rank from 8 cores in the affinity mask, one left to the rank's own "
        "thread; 2 NUMA nodes: threads and pages are not bound to one")
    chosen = coattention_share.rank_split(
        config, HeadInferConfig.parse({"cpu_attention": 2, "cpu_attention_threads": 3}),
        spec=None)
    assert chosen.threads == 3 and chosen.threads_why.startswith("set by cpu_attention_threads;")
