"""CPU co-attention's serving thread (coattention/service.py) against a GPU
played by a Python thread: it publishes each call's queries through the
handshake words as the CUDA stream does, waits for DONE and reads the
outputs, which must equal the CPU platform's call of the same layer share
(CpuShare.attend). Calls come from three layers (whole heads, a split head;
bf16 pages, or fp8 with per-head scales) over two step-metadata tables,
numbered across 2**32 (the words compare cyclically), with pauses that put
the thread to sleep, and a layer registered late (a restart). The GPU's
share ends before the kernel in every other call and after it in the rest,
but for one call whose launch "failed" after publishing (the word that says
its share ended is never written): the loop's counts of which reader was
last, of calls and of bytes read (the kernel's, and the GPU's by which
reader was last) must say so, and the next call be served."""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_headinfer.coattention.runtime import served_entry, served_layer
from vllm_headinfer.coattention.share import CpuShare, HostStep
from vllm_headinfer.coattention.service import (CALLS, CPU_LAST, CPU_LAST_GPU_BYTES,
                                                CPU_LAST_KERNEL_CYCLES, DONE, FINISHED,
                                                FLAG_WORDS, GPU_LAST, GPU_LAST_CYCLES,
                                                GPU_LAST_GPU_BYTES, GPU_LAST_KERNEL_CYCLES,
                                                KERNEL_BYTES, KERNEL_CYCLES, POSTED, PUBLISHED,
                                                SERVED, STOP, CoattentionService, reached)
from vllm_headinfer.coattention.kernel import raw_words, split_cut
from vllm_headinfer.kv_quant import fp8_dtype

GROUP, DIM, BLOCK, SLOT_TOKENS = 2, 64, 16, 8


class Layer:
    """A layer whose last ``share`` of its offloaded heads the CPU takes,
    as the serving loop reads it (runtime.served_layer) and as
    the CPU platform's path attends it (CpuShare.attend)."""

    def __init__(self, gen, offloaded, share, kv_cache_dtype="auto", blocks=64):
        impl = SimpleNamespace(num_kv_heads=offloaded, group=GROUP, num_offloaded=offloaded,
                               scale=DIM**-0.5, kv_cache_dtype=kv_cache_dtype)
        self.share = CpuShare(impl, share, threads=2)
        values = torch.randn(blocks, offloaded, 2, BLOCK, DIM, generator=gen)
        fp8 = fp8_dtype(kv_cache_dtype)
        self.pages = values.to(torch.bfloat16) if fp8 is None else values.to(fp8).view(torch.uint8)
        # per-head scales (used by fp8 pages only)
        self.layer = SimpleNamespace(_k_scale=torch.rand(offloaded, generator=gen) + 0.5,
                                     _v_scale=torch.rand(offloaded, generator=gen) + 0.5)
        self.served = served_layer(self.share, self.layer, self.pages, lambda layer: 1.0)

    def expected(self, query, step):
        share = self.share
        table, seq_lens, starts = step
        tokens = query.shape[0]
        out = torch.empty(tokens, share.heads * GROUP, DIM)
        split_out = torch.empty(tokens, GROUP, DIM)
        split_lse = torch.empty(GROUP, tokens)
        share.attend(self.layer, query, self.pages, HostStep(table, seq_lens, starts, tokens),
                     out[:, GROUP:] if share.split_keep else out, split_out, split_lse)
        if share.split_keep:
            out[:, :GROUP] = split_out
        return out


def make_table(gen, seq_lens, query_lens, blocks=64):
    width = max(math.ceil(n / BLOCK) for n in seq_lens)
    table = torch.randperm(blocks, generator=gen)[: len(seq_lens) * width].view(len(seq_lens), width)
    starts = torch.tensor([0, *np.cumsum(query_lens)])
    return table, torch.tensor(seq_lens), starts


@pytest.mark.parametrize("first_call,kv_cache_dtype", [(0, "auto"), (2**32 - 3, "fp8_e4m3")])
def test_served_calls_equal_the_cpu_paths(first_call, kv_cache_dtype):
    gen = torch.Generator().manual_seed(0)
    # Two whole CPU heads; one whole and half of a split head; one head
    # (an engine's layers share the cache's format; fp8 with per-head scales).
    layers = {"a": Layer(gen, 3, 2, kv_cache_dtype), "b": Layer(gen, 3, 1.5, kv_cache_dtype),
              "c": Layer(gen, 2, 1, kv_cache_dtype)}
    tables = {"t0": make_table(gen, [100, 37], [1, 1]), "t1": make_table(gen, [250, 9, 64], [2, 1, 3])}
    flags = np.zeros(FLAG_WORDS, np.int32)
    slot = torch.empty(SLOT_TOKENS * 2 * GROUP * DIM, dtype=torch.bfloat16)
    out = np.zeros(SLOT_TOKENS * 2 * GROUP * DIM, np.float32)
    lse = np.zeros(SLOT_TOKENS * 2 * GROUP, np.float32)
    posted = []  # (call, layer, table) in the order the "stream" runs them
    gpu_done = threading.Event()
    results, errors = [], []

    def drain():  # the GPU finishes every posted call
        while len(results) + len(errors) < len(posted) and not gpu_done.is_set():
            threading.Event().wait(1e-3)

    service = CoattentionService(flags, raw_words(slot)[0], 1, out, lse, drain,
                                 idle_cycles=10_000_000, report_interval_s=None)
    service.posted = first_call
    service.control[[POSTED, SERVED]] = first_call
    flags[[PUBLISHED, DONE, FINISHED]] = np.int64(first_call).astype(np.int32)

    def gpu():
        classified = 0
        try:
            for done, (name, table) in enumerate(schedule):
                while done >= len(posted):
                    threading.Event().wait(1e-4)
                call = posted[done][0]
                query = queries[done]
                slot[: query.numel()] = query.reshape(-1)
                flags[PUBLISHED] = np.int64(call).astype(np.int32)
                gpu_first = done % 2 == 0
                if gpu_first:  # its share ended before the kernel did
                    flags[FINISHED] = np.int64(call).astype(np.int32)
                while not reached(flags[DONE], call):
                    threading.Event().wait(1e-5)
                if not gpu_first and done != 1:  # ... after it
                    flags[FINISHED] = np.int64(call).astype(np.int32)
                if done != 1:  # the loop has read the word before the next call is
                    classified += 1  # published (a real GPU takes milliseconds to get there)
                    while service.control[CPU_LAST] + service.control[GPU_LAST] < classified:
                        threading.Event().wait(1e-5)
                tokens, heads = query.shape[0], layers[name].share.heads
                rows = tokens * heads * GROUP
                got = torch.from_numpy(out[: rows * DIM].copy()).view(tokens, heads * GROUP, DIM)
                if torch.allclose(got, wants[done], atol=1e-5, rtol=1e-5):
                    results.append(call)
                else:
                    errors.append((call, name, table, (got - wants[done]).abs().max()))
        except BaseException as error:  # (a hang otherwise: drain() waits for this thread)
            errors.append(repr(error))
        finally:
            gpu_done.set()

    schedule = [("a", "t0"), ("b", "t0"), ("a", "t1"), ("b", "t1"), ("c", "t1"), ("a", "t0")]
    queries = [torch.randn(int(tables[t][2][-1]), layers[n].share.heads * GROUP, DIM,
                           generator=gen).to(torch.bfloat16) for n, t in schedule]
    # The CPU path's outputs, computed before the serving thread starts (the
    # "GPU" thread runs no kernel of its own beside it).
    wants = [layers[n].expected(q, tables[t]) for q, (n, t) in zip(queries, schedule)]
    service.register([(name, layers[name].served) for name in ("a", "b")],
                     [(name, tuple(x.reshape(-1).long().numpy() for x in step))
                      for name, step in tables.items()])
    thread = threading.Thread(target=gpu)
    thread.start()
    for i, (name, table) in enumerate(schedule):
        if name == "c":  # a late layer: the loop restarts after the GPU drained
            service.register([(name, layers[name].served)], [])
        if i == 3:  # a pause long enough for the loop to sleep
            threading.Event().wait(0.3)
        table_, seq_lens, starts = tables[table]
        call = service.post(name, table, len(seq_lens), table_.shape[1], int(starts[-1]))
        posted.append((call, name, table))
    answered = gpu_done.wait(300)
    service.stop()
    assert answered, f"the serving thread stopped answering: {errors}"
    assert not errors, errors
    assert [c for c, _, _ in posted] == [first_call + i + 1 for i in range(len(schedule))]
    counts = service.control
    assert counts[CALLS] == len(schedule)
    assert counts[CPU_LAST] == 3 and counts[GPU_LAST] == 2
    assert counts[KERNEL_CYCLES] > 0 and counts[GPU_LAST_CYCLES] > 0
    assert counts[KERNEL_BYTES] == sum(bytes_read(layers[n], tables[t]) for n, t in schedule)
    # The GPU's bytes and the kernel's cycles by which reader was last (the
    # call given up, the second, in neither).
    gpu_bytes = [gpu_bytes_read(layers[n], tables[t]) for n, t in schedule]
    assert counts[CPU_LAST_GPU_BYTES] == gpu_bytes[0] + gpu_bytes[2] + gpu_bytes[4] > 0
    assert counts[GPU_LAST_GPU_BYTES] == gpu_bytes[3] + gpu_bytes[5] > 0
    assert 0 < counts[CPU_LAST_KERNEL_CYCLES] and 0 < counts[GPU_LAST_KERNEL_CYCLES]
    assert counts[CPU_LAST_KERNEL_CYCLES] + counts[GPU_LAST_KERNEL_CYCLES] < counts[KERNEL_CYCLES]
    figures = service.figures(np.zeros_like(counts))
    rate = service.cycles_per_s()
    assert figures.kernel_bytes == counts[KERNEL_BYTES]
    assert (figures.cpu_last_calls, figures.gpu_last_calls) == (3, 2)
    assert figures.gpu_last_s == pytest.approx(
        (counts[GPU_LAST_KERNEL_CYCLES] + counts[GPU_LAST_CYCLES]) / rate)
    assert figures.cpu_last_gpu_bytes == counts[CPU_LAST_GPU_BYTES]
    assert service.report().startswith(f"{len(schedule)} layer calls: the kernel read ")
    assert service.report() is None  # (nothing since)


def bytes_read(layer, step):
    """The K/V bytes the kernel reads for a layer's share of a step."""
    share, (_, seq_lens, starts) = layer.share, step
    pages = 0
    for r, length in enumerate(seq_lens.tolist()):
        pages += math.ceil(length / BLOCK) * share.heads
        if share.split_keep:
            pages -= split_cut(length, int(starts[r + 1] - starts[r]), BLOCK, share.split_keep)
    return pages * 2 * BLOCK * DIM * layer.pages.element_size()


def gpu_bytes_read(layer, step):
    """The K/V bytes the GPU reads for the rest of the layer's offloaded
    heads: those it reads whole, and the split head's blocks the kernel
    leaves it."""
    share, (_, seq_lens, starts) = layer.share, step
    pages = 0
    for r, length in enumerate(seq_lens.tolist()):
        pages += math.ceil(length / BLOCK) * share.gpu_heads
        if share.split_keep:
            pages += split_cut(length, int(starts[r + 1] - starts[r]), BLOCK, share.split_keep)
    return pages * 2 * BLOCK * DIM * layer.pages.element_size()


def test_stop_while_the_loop_reports():
    """A stop asked while the loop's thread reports (between the loop going
    idle and the thread's sleep) still ends the thread."""
    gen = torch.Generator().manual_seed(1)
    layer = Layer(gen, 2, 1)
    reporting = threading.Event()

    class Service(CoattentionService):
        def report(self):
            reporting.set()
            while not self.control[STOP]:
                threading.Event().wait(1e-3)
            threading.Event().wait(0.05)  # stop() has set the wake event by now
            return None

    service = Service(np.zeros(FLAG_WORDS, np.int32), np.zeros(GROUP * DIM, np.int16), 1,
                      np.zeros(GROUP * DIM, np.float32), np.zeros(GROUP, np.float32),
                      lambda: None, idle_cycles=1000, report_interval_s=0)
    table = tuple(x.reshape(-1).long().numpy() for x in make_table(gen, [20], [1]))
    service.register([("a", layer.served)], [("t", table)])
    assert reporting.wait(300), "the loop never went idle"
    stopper = threading.Thread(target=service.stop, daemon=True)
    stopper.start()
    stopper.join(30)
    assert not stopper.is_alive(), "stop() waits for a thread asleep"


def test_the_report_goes_out_through_vllms_logging():
    """The loop's report line reaches the handler of vLLM's own logging
    configuration, applied as an engine process applies it (what an engine's
    log shows), not only a logger of its own that nothing prints."""
    import io
    import logging

    from vllm.config import LoggingConfig
    from vllm.logger import configure_logging

    root = logging.getLogger("vllm")
    saved = (root.handlers[:], root.level, root.propagate, logging.getLogRecordFactory())
    configure_logging(LoggingConfig())
    assert root.handlers, "vLLM's logging configuration is off (VLLM_CONFIGURE_LOGGING)"
    stream = io.StringIO()
    root.handlers[0].setStream(stream)
    try:
        gen = torch.Generator().manual_seed(2)
        layer = Layer(gen, 2, 1)
        flags = np.zeros(FLAG_WORDS, np.int32)
        service = CoattentionService(flags, np.zeros(GROUP * DIM, np.int16), 1,
                                     np.zeros(GROUP * DIM, np.float32), np.zeros(GROUP, np.float32),
                                     lambda: None, idle_cycles=1000, report_interval_s=0)
        table = make_table(gen, [20], [1])
        service.register([("a", layer.served)],
                         [("t", tuple(x.reshape(-1).long().numpy() for x in table))])
        call = service.post("a", "t", 1, table[0].shape[1], 1)
        flags[FINISHED] = flags[PUBLISHED] = call  # the "GPU" published it and read its share
        for _ in range(3000):  # (the first call may compile the loop)
            if "layer calls" in stream.getvalue():
                break
            threading.Event().wait(0.1)
        service.stop()
    finally:
        root.handlers, root.level, root.propagate = saved[:3]
        logging.setLogRecordFactory(saved[3])
    assert "HEADINFER CPU co-attention: 1 layer calls: the kernel read" in stream.getvalue()


def test_a_share_that_goes_takes_its_served_layer_with_it():
    """The serving thread does not keep a share (its engine's layer) alive:
    once the share goes, the service forgets its layers, and with them
    their views of the host pool (the pages can go), and the loop ends;
    with nothing in flight, at once."""
    import gc
    import weakref

    gen = torch.Generator().manual_seed(3)
    layer = Layer(gen, 2, 1)
    flags = np.zeros(FLAG_WORDS, np.int32)
    service = CoattentionService(flags, np.zeros(GROUP * DIM, np.int16),
                                 1, np.zeros(GROUP * DIM, np.float32),
                                 np.zeros(GROUP, np.float32), lambda: None, idle_cycles=1000,
                                 report_interval_s=None)
    step = make_table(gen, [20], [1])
    table = tuple(x.reshape(-1).long().numpy() for x in step)
    key, served = served_entry(service, layer.share, layer.layer, layer.pages, lambda layer: 1.0)
    service.register([(key, served)], [("t", table)])
    assert len(service.layers) == 1 and service._layer_list
    call = service.post(key, "t", 1, step[0].shape[1], 1)
    flags[FINISHED] = flags[PUBLISHED] = call  # the "GPU" published it and read its share
    for _ in range(3000):
        if reached(flags[DONE], call):
            break
        threading.Event().wait(0.01)
    assert reached(flags[DONE], call), "the call was not served"
    share, pages = weakref.ref(layer.share), weakref.ref(layer.pages)
    thread = service._thread
    del layer, served
    gc.collect()
    assert share() is None, "the service keeps the share alive"
    assert not service.layers and not service._layer_list and not service.tables
    assert service._thread is None and not thread.is_alive(), "the loop holds the layers' pages"
    assert pages() is None, "the served layer still holds the engine's host pages"
