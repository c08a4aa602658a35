"""Host memory for the offloaded heads' KV.

One allocation per KV cache group of layers (``[layers, blocks, H_off, 2, N, D]``,
see layout.py). Block ids are vLLM's own: block ``b`` of the host pool holds
the offloaded heads of the same tokens as device block ``b``.

On CUDA the allocation is registered with ``cudaHostRegister`` (exact size,
deterministic unpin; PyTorch's pinned allocator rounds sizes up) and each
layer also gets a device view of it through unified virtual addressing, which
kernels read and write directly.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from vllm.logger import init_logger

from vllm_headinfer.host_memory import available_host_bytes
from vllm_headinfer.layout import host_page_shape
from vllm_headinfer.spec import HeadInferAttentionSpec

logger = init_logger("vllm.headinfer.host_pool")


class HostPinningError(RuntimeError):
    pass


# What a pool must leave free on the node when it is allocated (this rank's
# later buffers, the other processes, the OS); an allocation past the real
# free memory would get the process killed instead of raising.
POOL_MARGIN_BYTES = 4 << 30


class HostMemoryError(RuntimeError):
    pass


def _check_host_memory(nbytes: int) -> None:
    free = available_host_bytes()
    if nbytes > free - POOL_MARGIN_BYTES:
        raise HostMemoryError(
            f"HEADINFER needs {nbytes / (1 << 30):.2f} GiB of host memory for this "
            f"rank's offloaded KV, but only {free / (1 << 30):.2f} GiB is free now "
            f"(a {POOL_MARGIN_BYTES >> 30} GiB margin stays free). Lower "
            "additional_config.headinfer.cpu_kv_gib (per rank) to at most "
            f"{max(0, free - POOL_MARGIN_BYTES) / (1 << 30):.2f}."
        )


def huge_page_mapping(nbytes: int) -> mmap.mmap:
    """Anonymous memory (zero-filled) backed by transparent huge pages.

    The GPU reads host pages through the IOMMU; with 4 KiB pages, decode reads
    over UVA measured 37-41 GB/s on a 55 GB/s link, with 2 MiB pages 51 GB/s
    (benchmarks/RESULTS.md). Kernels in THP "madvise" mode give huge pages
    only to mappings that ask for them.
    """
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


def huge_page_share(address: int, nbytes: int) -> float:
    """The share of ``[address, address + nbytes)`` the kernel backs with
    transparent huge pages now (``AnonHugePages`` of the mappings it spans in
    ``/proc/self/smaps``). ``madvise`` only asks: with THP off, or memory too
    fragmented to compact, the pages stay 4 KiB."""
    end = address + nbytes
    huge, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if not first.endswith(":"):  # a mapping's header: "start-end perms ..."
                start, stop = (int(x, 16) for x in first.split("-"))
                inside = start < end and stop > address
            elif inside and first == "AnonHugePages:":
                huge += int(line.split()[1]) << 10
    return min(1.0, huge / nbytes)


# Below this share of huge pages the link reads of a decode step are
# measurably slower (4 KiB against 2 MiB pages: 37-41 against 51 GB/s on one
# H100 host, 17 against 32 on another; benchmarks/RESULTS.md, runs 2 and 23).
HUGE_PAGE_SHARE_EXPECTED = 0.9


# Bytes one thread faults in per call: small enough to spread a pool over
# the threads, large enough that the calls cost nothing.
PREFAULT_CHUNK = 256 << 20


def _prefault(address: int, nbytes: int) -> None:
    """Writes zeros over the pool from several threads. ctypes releases the
    GIL, so the page faults proceed in parallel where the process may use
    several cores; a memset runs at memory speed where torch's elementwise
    fill of the same pages measured 0.45 GB/s (8 GiB in 18 s on CPU)."""
    starts = range(0, nbytes, PREFAULT_CHUNK)
    threads = max(1, min(8, len(os.sched_getaffinity(0))))

    def zero(start: int) -> None:
        ctypes.memset(address + start, 0, min(PREFAULT_CHUNK, nbytes - start))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(zero, starts))


def thp_mode() -> str:
    """The kernel's THP setting, its choice in brackets ("always [madvise] never")."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


class HostKVPool:
    """The host KV of a group of layers that share one spec and block count."""

    def __init__(
        self,
        layer_names: list[str],
        spec: HeadInferAttentionSpec,
        num_blocks: int,
        pin: bool,
    ) -> None:
        self.layer_names = list(layer_names)
        self._index = {name: i for i, name in enumerate(self.layer_names)}
        self.spec = spec
        self.num_blocks = num_blocks
        if spec.head_size != spec.head_size_v:
            raise NotImplementedError(
                "HEADINFER offloads layers whose K and V heads have the same size; "
                f"this model has {spec.head_size} and {spec.head_size_v}."
            )
        shape = (
            len(layer_names),
            *host_page_shape(
                num_blocks, spec.num_offloaded_kv_heads, spec.block_size, spec.head_size
            ),
        )
        self.nbytes = math.prod(shape) * spec.dtype.itemsize
        _check_host_memory(self.nbytes)
        # Tens of GiB take seconds to fault in and pin: say so before.
        logger.info(
            "HEADINFER host pool: allocating %.3f GiB for %d layers%s",
            self.nbytes / (1 << 30),
            len(layer_names),
            " (pinned)" if pin else "",
        )
        self._mapping = huge_page_mapping(self.nbytes)
        self.tensor = torch.frombuffer(self._mapping, dtype=spec.dtype).view(shape)
        started = time.monotonic()
        # Fault every page in now, so memory that is not there fails at
        # startup rather than mid-request, and pinning finds it resident.
        _prefault(self.tensor.data_ptr(), self.nbytes)
        self._registered = False
        self.device_view: torch.Tensor | None = None
        if pin:
            self._register()
        on_huge_pages = huge_page_share(self.tensor.data_ptr(), self.nbytes)
        logger.info(
            "HEADINFER host pool: %.3f GiB for %d layers ready%s in %.1f s, %.0f%% on huge pages",
            self.nbytes / (1 << 30),
            len(layer_names),
            " and pinned" if pin else "",
            time.monotonic() - started,
            100 * on_huge_pages,
        )
        if pin and on_huge_pages < HUGE_PAGE_SHARE_EXPECTED:
            logger.warning(
                "HEADINFER host pool: only %.0f%% of it is on transparent huge pages "
                "(/sys/kernel/mm/transparent_hugepage/enabled: %s); the GPU reads "
                "offloaded KV through 4 KiB pages 25-47%% slower. Set it to "
                "'madvise' or 'always', or start with more free (unfragmented) memory.",
                100 * on_huge_pages,
                thp_mode(),
            )

    def _register(self) -> None:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 0)
        if int(err) != 0:
            raise HostPinningError(
                f"HEADINFER could not pin {self.nbytes / (1 << 30):.2f} GiB of host "
                f"memory for offloaded KV (cudaHostRegister error {int(err)}). "
                "Lower additional_config.headinfer.cpu_kv_gib, or raise the "
                "locked-memory limit (ulimit -l / the container's memlock)."
            )
        self._registered = True
        from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

        self.device_view = get_accelerator_view_from_cpu_tensor(self.tensor)

    def layer(self, layer_name: str) -> torch.Tensor:
        """``[blocks, H_off, 2, N, D]`` host pages of one layer."""
        return self.tensor[self._index[layer_name]]

    def device_layer(self, layer_name: str) -> torch.Tensor:
        """The same pages as a CUDA tensor (UVA); CUDA only."""
        assert self.device_view is not None
        return self.device_view[self._index[layer_name]]

    def release(self) -> None:
        if self._registered:
            self.device_view = None
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._registered = False
        self.tensor = torch.empty(0)
        try:
            self._mapping.close()
        except BufferError:  # a view is still alive; the GC unmaps it later
            pass

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: the OS reclaims it anyway
            pass


class HostPoolRegistry:
    """Per-process map from layer name to its pool.

    Builders are created once per KV cache group (and per micro-batch), and
    again for the profiling pass with a minimal cache; a pool is replaced
    only when the block count changes, and the old one is released first so
    host memory never holds two generations. The map holds pools weakly: the
    layers that read a pool keep it alive, so an engine shut down in a
    process that goes on (``LLM(...)`` started again) leaves no pool behind.
    """

    def __init__(self) -> None:
        self._pools: weakref.WeakValueDictionary[str, HostKVPool] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def ensure(
        self,
        layer_names: list[str],
        spec: HeadInferAttentionSpec,
        num_blocks: int,
        pin: bool,
    ) -> HostKVPool:
        with self._lock:
            current = {id(self._pools.get(n)) for n in layer_names}
            pool = self._pools.get(layer_names[0])
            if (
                pool is not None
                and len(current) == 1
                and pool.num_blocks == num_blocks
                and pool.spec == spec
            ):
                return pool
            self._drop(layer_names)
            pool = HostKVPool(layer_names, spec, num_blocks, pin)
            for name in layer_names:
                self._pools[name] = pool
            return pool

    def _drop(self, layer_names: list[str]) -> None:
        for name in layer_names:
            old = self._pools.pop(name, None)
            if old is not None and old not in self._pools.values():
                old.release()

    def release_layers(self, layer_names: list[str]) -> None:
        """These layers keep every head on the device now: an engine built
        before in this process may have left pools for them."""
        with self._lock:
            self._drop(layer_names)

    def get(self, layer_name: str) -> HostKVPool | None:
        return self._pools.get(layer_name)

    def total_bytes(self) -> int:
        """Host memory this process holds for offloaded KV."""
        return sum(pool.nbytes for pool in set(self._pools.values()))



host_pools = HostPoolRegistry()
