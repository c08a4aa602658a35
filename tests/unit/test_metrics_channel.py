"""The file that carries the placement from the engine core to the API
server's /metrics: written per user, read back, and swept when stale."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

from vllm_headinfer import metrics
from vllm_headinfer import placement as policy


def test_publish_read_and_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "CHANNEL_DIR", str(tmp_path / "channel"))
    config = SimpleNamespace(instance_id="abc", parallel_config=SimpleNamespace(data_parallel_rank=0))
    kv = policy.RankKV((0, 1), 2, 16, 1024, 32)
    placement = policy.Placement(kv, (2, 1), 100, "device")
    metrics.publish(config, placement)
    record = metrics.read(config, 0)
    assert record["resident_head_layers"] == 3 and record["offloaded_head_layers"] == 1
    assert record["host_kv_bytes"] == 100 * 1024 and record["pool_tokens"] == 99 * 16
    assert record["counts"] == [2, 1] and record["summary"] == placement.summary()

    path = metrics.channel_path(config, 0)
    old = time.time() - metrics.STALE_SECONDS - 60
    os.utime(path, (old, old))
    metrics.sweep_stale()
    assert metrics.read(config, 0) is None


def test_publish_never_fails_a_start(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setattr(metrics, "CHANNEL_DIR", str(blocker / "channel"))
    config = SimpleNamespace(instance_id="abc", parallel_config=SimpleNamespace(data_parallel_rank=0))
    kv = policy.RankKV((0,), 1, 16, 1024, 32)
    metrics.publish(config, policy.Placement(kv, (1,), 10, "device"))  # logs, does not raise
    assert metrics.read(config, 0) is None
