"""Placement and link load on ``/metrics`` (``headinfer:`` series).

The placement is decided in the engine core; ``/metrics`` is served by the
API server process, whose stat loggers vLLM loads from the
``vllm.stat_logger_plugins`` entry point. The engine core writes the
placement to a small JSON file named after the engine's ``instance_id``
(the same in every process of one engine) in the temporary directory, and
the stat logger reads it once the engine is up, then updates the link-load
gauge from each step's scheduler stats.

Series (per engine, label ``engine``):

* ``headinfer:resident_head_layers`` / ``headinfer:offloaded_head_layers``:
  KV heads x layers per rank kept on the device / in host memory;
* ``headinfer:device_kv_bytes`` / ``headinfer:host_kv_bytes``: KV bytes per
  rank on each side;
* ``headinfer:pool_tokens``: tokens the KV pool holds;
* ``headinfer:host_kv_read_bytes_per_step``: offloaded KV of the blocks in
  use, per rank, i.e. what a decode step over the running requests reads
  over the link (blocks in use x host bytes per block).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import tempfile
import time

from vllm.logger import init_logger
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from vllm_headinfer.placement import Placement

logger = init_logger("vllm.headinfer.metrics")
# Per user: another user's directory of the same name must not stop a start.
CHANNEL_DIR = os.path.join(tempfile.gettempdir(), f"vllm-headinfer-{os.getuid()}")


def channel_path(vllm_config, engine_index: int) -> str:
    return os.path.join(CHANNEL_DIR, f"{vllm_config.instance_id}-{engine_index}.json")


def publish(vllm_config, p: Placement) -> None:
    """Engine core: writes the placement for the API server's stat logger
    (and for ``read``: examples and tools that show the placement)."""
    record = {
        "resident_head_layers": p.resident_head_layers,
        "offloaded_head_layers": p.kv.head_layers - p.resident_head_layers,
        "device_kv_bytes": p.num_blocks * p.device_bytes_per_block,
        "host_kv_bytes": p.num_blocks * p.host_bytes_per_block,
        "pool_tokens": p.tokens,
        "num_blocks": p.num_blocks,
        "host_bytes_per_block": p.host_bytes_per_block,
        "layer_indices": list(p.kv.layer_indices),
        "counts": list(p.counts),
        "num_kv_heads": p.kv.num_kv_heads,
        "summary": p.summary(),
    }
    path = channel_path(vllm_config, vllm_config.parallel_config.data_parallel_rank)
    try:
        os.makedirs(CHANNEL_DIR, mode=0o700, exist_ok=True)
        sweep_stale()
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as e:  # metrics are not worth a failed start
        logger.warning("HEADINFER: placement not published for /metrics: %s", e)
        return
    atexit.register(_remove, path)


# A forked engine core ends with os._exit, which skips atexit: its file
# stays. Files this old belong to engines that have ended.
STALE_SECONDS = 7 * 24 * 3600


def sweep_stale(now: float | None = None) -> None:
    now = time.time() if now is None else now
    for name in os.listdir(CHANNEL_DIR):
        path = os.path.join(CHANNEL_DIR, name)
        with contextlib.suppress(OSError):
            if now - os.path.getmtime(path) > STALE_SECONDS:
                os.remove(path)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def read(vllm_config, engine_index: int) -> dict | None:
    try:
        with open(channel_path(vllm_config, engine_index)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


STATIC = {
    "resident_head_layers": "KV head-layers per rank kept in device KV pages.",
    "offloaded_head_layers": "KV head-layers per rank kept in host memory.",
    "device_kv_bytes": "Device KV cache bytes per rank.",
    "host_kv_bytes": "Host KV pool bytes per rank (pinned on CUDA).",
    "pool_tokens": "Tokens the KV pool holds.",
}
LINK_LOAD = "host_kv_read_bytes_per_step"


class HeadInferStatLogger(AggregateStatLoggerBase):
    """The ``headinfer:`` series, for engines that select HEADINFER (added
    to them by patches/stat_logger_registration.py)."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None) -> None:
        self.vllm_config = vllm_config
        self.engine_indexes = list(engine_indexes or [0])
        self.placements: dict[int, dict] = {}

    def log_engine_initialized(self) -> None:
        for engine in self.engine_indexes:
            record = read(self.vllm_config, engine)
            if record is None:
                continue
            self.placements[engine] = record
            for name, doc in STATIC.items():
                _gauge(name, doc).labels(engine=str(engine)).set(record[name])
            _gauge(LINK_LOAD, _LINK_DOC).labels(engine=str(engine)).set(0)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        record = self.placements.get(engine_idx)
        if record is None or scheduler_stats is None:
            return
        # A step reads the blocks of its running requests: with none running
        # (the blocks of finished ones may be counted in use a step longer,
        # or kept for prefix caching) it reads nothing.
        in_use = round(scheduler_stats.kv_cache_usage * (record["num_blocks"] - 1))
        if scheduler_stats.num_running_reqs == 0:
            in_use = 0
        _gauge(LINK_LOAD, _LINK_DOC).labels(engine=str(engine_idx)).set(
            in_use * record["host_bytes_per_block"]
        )


_GAUGES: dict = {}


def _gauge(name: str, doc: str):
    """One gauge per series and process: prometheus refuses a second
    registration, and a process may build several engine clients."""
    import prometheus_client

    if name not in _GAUGES:
        _GAUGES[name] = prometheus_client.Gauge(
            f"headinfer:{name}", doc, ["engine"], multiprocess_mode="mostrecent"
        )
    return _GAUGES[name]


_LINK_DOC = (
    "Offloaded KV bytes per rank of the KV blocks in use: what a decode step "
    "over the running requests reads over the link."
)
