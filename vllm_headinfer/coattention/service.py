"""CPU co-attention's host side on CUDA: one thread that serves every
co-attending layer call of the process, handshaking with the GPU through
two words of pinned memory instead of host waits in the layers.

A layer call on the GPU's stream (runtime.py: post, collect) copies its CPU
heads' queries into the query slot and then writes the call's number into
the PUBLISHED word; later on the same stream it waits until the DONE word
holds that number, and copies the outputs back. The Python thread running
the model only posts each call's description (layer, step metadata) into a
ring and never waits: it runs ahead of the GPU as without co-attention.

The serving thread runs ``_serve``, compiled, without the GIL: for each
posted call in order it spins until the GPU has published it, runs the
kernel over the layer's pages into the output slot, and writes DONE. One
query slot and one output slot serve every call: call ``c + 1``'s queries
are copied after the GPU has waited for call ``c``'s DONE, and its outputs
are written after the GPU published it, which follows the copy of call
``c``'s outputs on the stream. Numbers compare cyclically in 32 bits, as
the GPU's wait does.

Idle for IDLE_CYCLES (a few tens of ms), the loop returns and the thread
sleeps until the next post wakes it: a busy engine never sleeps between
steps, an idle one does not keep a core spinning.

Which reader finishes last: after its share's launch the GPU writes the
call's number to a third word, FINISHED. Once the kernel is done (before it
writes DONE) the loop reads it: reached, the GPU had finished first and
waited for the CPU; not yet, the loop writes DONE and spins until it is
(nothing is lost: the next call is published after it on the stream) and
counts the cycles. A word
never written (the layer's launch failed after publishing) is given up at
the next call's publication or after UNFINISHED_IDLES idle timeouts. Those
counts, the kernel's cycles and the bytes it read are reported in the log
when the loop goes idle, at most every REPORT_INTERVAL_S: the engine's own
figures for the split (the startup measurement runs outside the engine).
By which reader was last, the loop also sums the kernel's cycles and the
GPU's bytes (the layer's other offloaded heads): tuning.py judges
and retunes auto's split by them.

Layers and step-metadata tables are fixed arguments of the loop; one not
yet among them restarts it (once per process in practice: the first call
registers every co-attending layer of the model). The loop is compiled (or
loaded from numba's cache) before it serves: at startup (``warm_up``) and
again, at once where the types are the same, before each start.

Failing loudly: the GPU's wait has no timeout of its own, so a loop that
raised, or a call published but not served within SERVE_TIMEOUT_S (a
watchdog thread looks), would hang the engine with /health still answering.
Either makes the service failed: DONE is set GIVE_UP calls past the last
posted call, which every wait the GPU was given accepts (it compares
cyclically, as ``reached``), so the stream runs on; and the model's thread
raises CoattentionFailure at its next post or registration, or between
steps (runtime.CoattentionRuntime.between_steps, which every step's
metadata calls), which vLLM turns into an engine error that fails the
running requests and marks the engine dead. The step in flight when it
failed finishes with whatever the output slot held for its CPU heads; the
next step raises.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numba
import numpy as np
from vllm.logger import init_logger

from vllm_headinfer.coattention.intrinsics import cycles, load_acquire, store_release
from vllm_headinfer.coattention.split import LoopFigures
from vllm_headinfer.coattention.kernel import run_attention, split_cut, use_threads

logger = init_logger("vllm.headinfer.coattention.service")


class CoattentionFailure(RuntimeError):
    """The serving thread failed or stopped answering: the engine cannot go
    on (its CPU heads' outputs are missing)."""


# Posted calls not yet served that the ring holds (the model's thread is at
# most a step of layers ahead of the GPU: far fewer).
RING = 4096
# Control words (int64), each on its own cache line, then the counters the
# loop adds to: calls served, the kernel's cycles and bytes read; the calls
# the GPU finished first, the kernel's cycles and the GPU's bytes in them;
# the calls it finished last, the cycles the loop waited for it, the
# kernel's cycles and the GPU's bytes in them.
POSTED, SERVED, STOP = 0, 8, 16
(CALLS, KERNEL_CYCLES, KERNEL_BYTES, CPU_LAST, CPU_LAST_KERNEL_CYCLES, CPU_LAST_GPU_BYTES,
 GPU_LAST, GPU_LAST_CYCLES, GPU_LAST_KERNEL_CYCLES, GPU_LAST_GPU_BYTES) = range(24, 34)
CONTROL_WORDS = 40
# Handshake words (int32, pinned on CUDA), each on its own cache line.
PUBLISHED, DONE, FINISHED = 0, 16, 32
FLAG_WORDS = 48
# The loop's return values.
STOPPED, IDLE = 0, 1
# Idle spinning before the loop returns: about 30 ms at 3 GHz (longer than
# the scheduler's gap between two decode steps).
IDLE_CYCLES = 100_000_000
# A GPU share still running this many idle timeouts (about 0.3 s) after the
# kernel ended is taken for one whose FINISHED word will never come.
UNFINISHED_IDLES = 10
# Least time between two of the log's reports (vLLM's stats interval).
REPORT_INTERVAL_S = 10.0
# A call the GPU published that the loop has not served after this long is
# taken for a stuck loop: a call's kernel takes milliseconds (a 1M-token
# layer share reads a few GB at 10+ GB/s), and no compile can fall in it
# (the loop is compiled before it starts).
SERVE_TIMEOUT_S = 10.0
# How often the watchdog looks at the words (it never touches a call's path).
WATCH_INTERVAL_S = 0.25
# How far past the last posted call a failed service sets DONE: further than
# any call the GPU can have been given (at most RING past the served ones),
# and less than half the 32-bit cycle, so that every such wait reads it as
# reached.
GIVE_UP = 1 << 30

# Columns of the layer table and of a ring entry.
(L_HEADS, L_GROUP, L_DIM, L_BLOCK_SIZE, L_BLOCK_STRIDE, L_HEAD_STRIDE, L_CODE, L_SPLIT_KEEP,
 L_THREADS, L_GPU_HEADS) = range(10)
C_LAYER, C_TABLE, C_REQUESTS, C_BLOCKS, C_TOKENS = range(5)


@numba.njit(nogil=True, cache=True)
def cycle_count():
    """The cycle counter, read from Python (to convert cycles to seconds)."""
    return cycles()


@numba.njit(inline="always")
def _pages_read(length_of, starts, n, block_size, split_keep):
    """``(head_pages, cut)`` of a call: the blocks of every request's
    context (one head's pages), and those of the split head the GPU attends
    (``split_cut``)."""
    blocks = 0
    cut = 0
    for r in range(n):
        length = length_of[r]
        blocks += (length + block_size - 1) // block_size
        if split_keep:
            cut += split_cut(length, starts[r + 1] - starts[r], block_size, split_keep)
    return blocks, cut


@numba.njit(inline="always")
def reached(word, number):
    """Whether a 32-bit handshake word has reached call ``number``: their
    difference, cyclic in 32 bits, is not negative."""
    return ((np.int64(word) - number) & 0xFFFFFFFF) < 0x80000000


@numba.njit(nogil=True, cache=True)
def _serve(control, ring, flags, layers, layer_scale, kv_scales, pages, tables, lens, starts,
           query_code, queries, out, lse, idle_cycles):
    """Serves posted calls in order until told to stop or idle for
    ``idle_cycles``; returns STOPPED or IDLE."""
    served = control[SERVED]
    idle_since = cycles()
    while True:
        if load_acquire(control, STOP) != 0:
            return STOPPED
        if load_acquire(control, POSTED) <= served:
            if cycles() - idle_since > idle_cycles:
                return IDLE
            continue
        call = served + 1
        entry = ring[call % RING]
        while not reached(load_acquire(flags, PUBLISHED), call):
            if load_acquire(control, STOP) != 0:
                return STOPPED
        info = layers[entry[C_LAYER]]
        heads, group, dim = info[L_HEADS], info[L_GROUP], info[L_DIM]
        table = entry[C_TABLE]
        n, blocks, tokens = entry[C_REQUESTS], entry[C_BLOCKS], entry[C_TOKENS]
        rows = tokens * heads * group
        began = cycles()
        run_attention(queries[: rows * dim], query_code, tokens, heads, group, dim,
                      pages[entry[C_LAYER]], info[L_BLOCK_STRIDE], info[L_HEAD_STRIDE],
                      info[L_BLOCK_SIZE], info[L_CODE], kv_scales[entry[C_LAYER], :heads],
                      tables[table][: n * blocks].reshape((n, blocks)), lens[table][:n],
                      starts[table][: n + 1], layer_scale[entry[C_LAYER]], info[L_THREADS],
                      info[L_SPLIT_KEEP], out[: rows * dim].reshape((tokens, heads, group, dim)),
                      lse[:rows].reshape((tokens, heads, group)))
        ended = cycles()
        # Before DONE, so that the GPU cannot have gone on to the next call
        # (nor the next step's metadata copies into the tables).
        page_bytes = 2 * info[L_BLOCK_SIZE] * dim * pages[entry[C_LAYER]].itemsize
        head_pages, cut = _pages_read(lens[table], starts[table], n, info[L_BLOCK_SIZE],
                                      info[L_SPLIT_KEEP])
        cpu_bytes = (head_pages * heads - cut) * page_bytes
        # The GPU's: the layer's other offloaded heads, and the split head's
        # blocks the kernel left.
        gpu_bytes = (head_pages * info[L_GPU_HEADS] + cut) * page_bytes
        gpu_first = reached(load_acquire(flags, FINISHED), call)
        store_release(flags, DONE, call)  # (its low 32 bits)
        served = call
        store_release(control, SERVED, served)
        control[CALLS] += 1
        control[KERNEL_CYCLES] += ended - began
        control[KERNEL_BYTES] += cpu_bytes
        if gpu_first:
            control[CPU_LAST] += 1
            control[CPU_LAST_KERNEL_CYCLES] += ended - began
            control[CPU_LAST_GPU_BYTES] += gpu_bytes
        else:
            while True:
                # PUBLISHED first: the stream writes FINISHED before the next
                # call's PUBLISHED, so a FINISHED read after it is the final one.
                went_past = reached(load_acquire(flags, PUBLISHED), call + 1)
                finished = load_acquire(flags, FINISHED)
                if reached(finished, call) and not reached(finished, call + 1):
                    control[GPU_LAST] += 1
                    control[GPU_LAST_CYCLES] += cycles() - ended
                    control[GPU_LAST_KERNEL_CYCLES] += ended - began
                    control[GPU_LAST_GPU_BYTES] += gpu_bytes
                    break
                if load_acquire(control, STOP) != 0:
                    return STOPPED
                # The GPU went past the word without writing it.
                if went_past or cycles() - ended > UNFINISHED_IDLES * idle_cycles:
                    break
        idle_since = cycles()


@dataclass
class ServedLayer:
    """A co-attending layer as the loop reads it: its CPU heads' pages as
    the kernel's flat array (kernel.flat_pages), their format and
    scales, and the share's shape."""

    pages: np.ndarray
    block_stride: int
    head_stride: int
    block_size: int
    code: int
    heads: int
    group: int
    dim: int
    split_keep: int
    threads: int
    scale: float
    kv_scales: np.ndarray  # [heads, 2]
    gpu_heads: int  # the layer's offloaded heads the GPU reads whole (for its bytes)


class CoattentionService:
    """The serving thread, its ring and slots. ``flags`` the handshake
    words (pinned on CUDA), ``queries`` the query slot (raw words of the
    queries' format ``query_code``), ``out``/``lse`` the output slots
    (float32). ``drain`` makes the GPU finish what it was given (before a
    restart: every posted call served). The log gets ``report()`` when
    the loop goes idle, at most every ``report_interval_s`` (None: never).
    ``failure`` says why the service failed (the module docstring), None
    while it works; ``serve_timeout_s`` is the watchdog's bound."""

    def __init__(self, flags: np.ndarray, queries: np.ndarray, query_code: int, out: np.ndarray,
                 lse: np.ndarray, drain: Callable[[], None], idle_cycles: int = IDLE_CYCLES,
                 report_interval_s: float | None = REPORT_INTERVAL_S,
                 serve_timeout_s: float = SERVE_TIMEOUT_S):
        self.flags, self.queries, self.query_code = flags, queries, query_code
        self.out, self.lse = out, lse
        self.drain, self.idle_cycles = drain, idle_cycles
        self.report_interval_s = report_interval_s
        self.serve_timeout_s = serve_timeout_s
        self.failure: str | None = None
        self.control = np.zeros(CONTROL_WORDS, np.int64)
        self.ring = np.zeros((RING, 5), np.int64)
        self.posted = 0
        self.layers: dict[object, int] = {}  # a layer's key -> index
        self.tables: dict[object, int] = {}  # a step-metadata table set's key -> index
        self._layer_list: list[ServedLayer] = []
        self._table_list: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._closing = threading.Event()  # ends the watchdog
        self._forget_pending = False  # (forget)
        self._wake = threading.Event()
        self._sleeping = False
        self._reported = np.zeros(CONTROL_WORDS, np.int64)  # the counters at the last report
        self._next_report = 0.0  # (time.monotonic)
        self._cycles_per_s = 0.0

    def register(self, layers: Sequence[tuple[object, ServedLayer]],
                 tables: Sequence[tuple[object, tuple[np.ndarray, np.ndarray, np.ndarray]]]) -> None:
        """Adds layers and step-metadata tables (flat block table, lengths,
        query starts: int64), each under a key object, restarting the loop
        where any is new."""
        self.raise_failure()
        self.release_forgotten()
        new_layers = [(k, v) for k, v in layers if k not in self.layers]
        new_tables = [(k, v) for k, v in tables if k not in self.tables]
        if not new_layers and not new_tables:
            return
        self.stop()
        self.raise_failure()  # (it failed while stop() waited for the GPU)
        for key, layer in new_layers:
            self.layers[key] = len(self._layer_list)
            self._layer_list.append(layer)
        for key, table in new_tables:
            self.tables[key] = len(self._table_list)
            self._table_list.append(table)
        self._start()

    def post(self, layer_key, table_key, requests: int, blocks: int, tokens: int) -> int:
        """Posts one call and returns its number (the value the GPU writes
        to PUBLISHED, then waits for in DONE)."""
        self.raise_failure()
        call = self.posted + 1
        while call - self.control[SERVED] >= RING:  # (never in practice: a step is shorter)
            self.raise_failure()
            threading.Event().wait(1e-4)
        self.ring[call % RING] = (self.layers[layer_key], self.tables[table_key],
                                  requests, blocks, tokens)
        self.control[POSTED] = call
        self.posted = call
        if self._sleeping:
            self._wake.set()
        return call

    def raise_failure(self) -> None:
        """Raises CoattentionFailure where the service failed."""
        if self.failure is not None:
            raise CoattentionFailure(self.failure)

    def forget(self) -> None:
        """Drops every layer and table (an engine's layers went away), never
        before the calls already posted are served (the GPU may wait on
        them): the loop ends, and with it its hold on their memory. Weakref
        finalizers call it, from whichever thread collected the layer."""
        if threading.current_thread() in (self._thread, self._watchdog):
            # A collection in one of the service's own threads, which cannot
            # join themselves: another thread does it.
            threading.Thread(target=self.forget, daemon=True,
                             name="headinfer-coattention-forget").start()
            return
        if self.control[SERVED] < self.posted:
            # Calls in flight: the collection may have run inside a layer
            # call, between its post and its publication, in this very
            # thread, and the loop cannot stop before serving that call. The
            # model's thread lets go between steps (release_forgotten).
            self._forget_pending = True
            return
        self.close()

    def release_forgotten(self) -> None:
        """Does a forget() left for later. The model's thread calls it
        between steps and before registering, where every call it posted
        has been published."""
        if self._forget_pending:
            self.close()

    def close(self) -> None:
        """Ends the loop once every posted call is served and lets go of
        every layer and table: for the model's thread, where every call it
        posted has been published."""
        self._forget_pending = False
        self.stop()
        self.layers.clear()
        self.tables.clear()
        self._layer_list.clear()
        self._table_list.clear()

    def stop(self) -> None:
        """Ends the loop once every posted call the GPU published is served.
        A call still unserved serve_timeout_s after the GPU drained was
        never published (its layer's launch failed between the post and the
        publication), so no wait of the GPU's follows it: it is dropped
        rather than waited for forever."""
        if self._thread is None:
            return
        if self.failure is None and self.control[SERVED] < self.posted:
            # (were the loop to fail meanwhile, the watchdog frees the GPU)
            self.drain()
        deadline = time.monotonic() + self.serve_timeout_s
        while (self.failure is None and self.control[SERVED] < self.posted
               and time.monotonic() < deadline):
            threading.Event().wait(1e-4)
        self.control[STOP] = 1
        self._wake.set()
        self._thread.join(self.serve_timeout_s)
        if self._thread.is_alive():  # (stuck in a kernel: the loop checks STOP between calls)
            self._fail("the serving thread did not stop")
        self._closing.set()
        self._watchdog.join()
        self._thread = self._watchdog = None
        if self.failure is not None:
            return  # (STOP stays set: a failed service serves nothing more)
        unpublished = self.posted - int(self.control[SERVED])
        if unpublished:
            logger.warning("HEADINFER CPU co-attention: %d posted layer call(s) were never "
                           "published by the GPU; dropped", unpublished)
        self.control[SERVED] = self.posted
        self.control[STOP] = 0

    def _start(self) -> None:
        args = serving_arguments(self.control, self.ring, self.flags, self._layer_list,
                                 self._table_list, self.query_code, self.queries, self.out,
                                 self.lse, self.idle_cycles)
        # Compiled (or loaded) here, before any call is published, so that
        # no compile counts against the watchdog's bound.
        compile_loop(args)
        threads = max(layer.threads for layer in self._layer_list)
        self._thread = threading.Thread(target=self._run, args=(threads, args), daemon=True,
                                        name="headinfer-coattention")
        self._closing = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, args=(self._closing,), daemon=True,
                                          name="headinfer-coattention-watchdog")
        self._thread.start()
        self._watchdog.start()

    def _fail(self, reason: str) -> None:
        """Makes the service failed (the module docstring): the GPU's waits
        pass, the model's thread raises at its next post."""
        if self.failure is not None:
            return
        self.failure = (f"HEADINFER CPU co-attention failed: {reason}. The CPU heads' outputs "
                        "are missing, so the engine stops; restart it, or set "
                        "additional_config.headinfer.cpu_attention to 'off' if this repeats")
        logger.error("%s", self.failure)
        self.control[STOP] = 1
        self._give_up()
        self._wake.set()

    def _give_up(self) -> None:
        """DONE set past every call the GPU can wait on (GIVE_UP)."""
        self.flags[DONE] = np.int64(self.posted + GIVE_UP).astype(np.int32)

    def _watch(self, closing: threading.Event) -> None:
        """Fails the service where a call the GPU published stays unserved
        for serve_timeout_s. It reads the words the loop and the GPU write
        and takes no lock: the calls' path is as fast without it."""
        interval = min(WATCH_INTERVAL_S, self.serve_timeout_s / 4)
        stalled_at, since = -1, 0.0
        while not closing.wait(interval):
            served = int(self.control[SERVED])
            if self.posted <= served or not reached(self.flags[PUBLISHED], served + 1):
                stalled_at = -1  # (nothing the GPU waits on: the loop may sleep)
                continue
            now = time.monotonic()
            if served != stalled_at:
                stalled_at, since = served, now
            elif now - since > self.serve_timeout_s:
                self._fail(f"layer call {served + 1} was not served {now - since:.1f} s after the "
                           "GPU published it (the serving thread is stuck)")
                return

    def cycles_per_s(self) -> float:
        """The cycle counter's rate (constant on current x86 processors),
        measured over 20 ms at the first call."""
        if not self._cycles_per_s:
            cycle_count()  # compiled (or loaded) first
            t0, c0 = time.perf_counter(), cycle_count()
            time.sleep(0.02)
            self._cycles_per_s = (cycle_count() - c0) / (time.perf_counter() - t0)
        return self._cycles_per_s

    def figures(self, since: np.ndarray, now: np.ndarray | None = None) -> LoopFigures:
        """What the loop counted from the counters ``since`` to ``now``
        (copies of ``control``; now: the live counters), in seconds and
        bytes."""
        delta = (self.control if now is None else now) - since
        rate = self.cycles_per_s()
        return LoopFigures(
            kernel_s=delta[KERNEL_CYCLES] / rate, kernel_bytes=float(delta[KERNEL_BYTES]),
            cpu_last_calls=int(delta[CPU_LAST]),
            cpu_last_kernel_s=delta[CPU_LAST_KERNEL_CYCLES] / rate,
            cpu_last_gpu_bytes=float(delta[CPU_LAST_GPU_BYTES]),
            gpu_last_calls=int(delta[GPU_LAST]),
            gpu_last_kernel_s=delta[GPU_LAST_KERNEL_CYCLES] / rate,
            gpu_last_gpu_bytes=float(delta[GPU_LAST_GPU_BYTES]),
            gpu_wait_s=delta[GPU_LAST_CYCLES] / rate,
        )

    def report(self) -> str | None:
        """What the loop has counted since the last report, as a line."""
        since, self._reported = self._reported, self.control.copy()
        figures = self.figures(since, self._reported)
        calls = int(self._reported[CALLS] - since[CALLS])
        if calls == 0:
            return None
        line = (f"{calls} layer calls: the kernel read {figures.kernel_bytes / figures.kernel_s / 1e9:.1f}"
                f" GB/s ({figures.kernel_s / calls * 1e3:.3f} ms a call); the GPU's share ended first"
                f" in {figures.cpu_last_calls / calls:.0%} of them")
        if figures.gpu_last_calls:
            late = figures.gpu_wait_s / figures.gpu_last_calls
            line += f", {late * 1e3:.3f} ms after the kernel in the others"
        return line

    def _run(self, threads: int, args: tuple) -> None:
        try:
            self._serve_until_stopped(threads, args)
        except BaseException as error:  # (the thread ends here: nothing else would say why)
            logger.exception("HEADINFER CPU co-attention: the serving thread raised")
            self._fail(f"the serving thread raised {type(error).__name__}: {error}")
        if self.failure is not None:
            # Again: the loop's last write of DONE may have followed _fail's.
            self._give_up()

    def _serve_until_stopped(self, threads: int, args: tuple) -> None:
        use_threads(threads)  # (numba's count is per calling thread)
        while _serve(*args) == IDLE:
            if self.report_interval_s is not None and time.monotonic() >= self._next_report:
                self._next_report = time.monotonic() + self.report_interval_s
                line = self.report()
                if line is not None:
                    logger.info("HEADINFER CPU co-attention: %s", line)
            # The GIL orders these with post() and stop(): a call posted (a
            # stop asked) before the check below is seen by it, one after
            # sets the event after it was cleared.
            self._wake.clear()
            self._sleeping = True
            if self.control[POSTED] == self.control[SERVED] and not self.control[STOP]:
                self._wake.wait()
            self._sleeping = False


def serving_arguments(control, ring, flags, layers: Sequence[ServedLayer],
                      tables: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], query_code,
                      queries, out, lse, idle_cycles) -> tuple:
    """``_serve``'s arguments for these layers and step-metadata tables."""
    heads = max(layer.heads for layer in layers)
    kv_scales = np.ones((len(layers), heads, 2), np.float32)
    for i, layer in enumerate(layers):
        kv_scales[i, : layer.heads] = layer.kv_scales
    # One row per layer, in the L_* columns' order.
    layer_table = np.array(
        [[x.heads, x.group, x.dim, x.block_size, x.block_stride, x.head_stride, x.code,
          x.split_keep, x.threads, x.gpu_heads] for x in layers], np.int64)
    return (
        control, ring, flags, layer_table, np.array([x.scale for x in layers], np.float32),
        kv_scales, numba.typed.List([x.pages for x in layers]),
        numba.typed.List([t[0] for t in tables]), numba.typed.List([t[1] for t in tables]),
        numba.typed.List([t[2] for t in tables]), query_code, queries, out, lse, idle_cycles,
    )


def compile_loop(args: tuple) -> None:
    """Compiles ``_serve`` for these arguments' types (or loads it from
    numba's cache; at once where it has them) without serving: with STOP
    set it returns at its first look. The serving thread is not running."""
    control = args[0]
    stop = control[STOP]
    control[STOP] = 1
    try:
        _serve(*args)
    finally:
        control[STOP] = stop


def warm_up(pages: np.ndarray, queries: np.ndarray, query_code: int) -> float:
    """Compiles the loop at startup for pages and queries of these arrays'
    types (kernel.flat_pages, raw_words), before any request: with a cold
    cache that takes about a minute, which a first request should not
    wait. Returns the seconds it took."""
    began = time.perf_counter()
    layer = ServedLayer(pages, 0, 0, 1, 0, 1, 1, 1, 0, 1, 1.0, np.ones((1, 2), np.float32), 0)
    table = tuple(np.zeros(2, np.int64) for _ in range(3))
    compile_loop(serving_arguments(
        np.zeros(CONTROL_WORDS, np.int64), np.zeros((RING, 5), np.int64),
        np.zeros(FLAG_WORDS, np.int32), [layer], [table], query_code, queries,
        np.zeros(1, np.float32), np.zeros(1, np.float32), IDLE_CYCLES))
    return time.perf_counter() - began
