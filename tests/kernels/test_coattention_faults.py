"""CPU co-attention's serving thread fails loudly: faults injected into the
service (coattention/service.py) against a GPU played by a Python thread
that publishes calls and then waits for DONE without end, as the stream's
cuStreamWaitValue32 does. Each fault must free that wait within seconds and
make the next post raise, and no stop or forget may leave a wait the GPU
was given unanswered. (A share that goes takes its layers with it:
test_coattention_service.py.)"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
import torch
from test_coattention_service import DIM, GROUP, SLOT_TOKENS, Layer, make_table

from vllm_headinfer.coattention import service as coattention_service
from vllm_headinfer.coattention.kernel import raw_words
from vllm_headinfer.coattention.service import (DONE, FINISHED, FLAG_WORDS, PUBLISHED, STOP,
                                                STOPPED, CoattentionFailure, CoattentionService,
                                                reached)

TIMEOUT_S = 0.5  # the watchdog's bound in these tests
PATIENCE_S = 60.0  # how long a test waits for what should take well under a second


class FakeGpu:
    """The stream's side: each call given is published (after ``delay``
    seconds), then waited for until DONE reaches it."""

    def __init__(self) -> None:
        self.flags = np.zeros(FLAG_WORDS, np.int32)
        self.given: list[int] = []
        self.finished: list[int] = []
        self._calls: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def give(self, call: int, delay: float = 0.0) -> None:
        self.given.append(call)
        self._calls.put((call, delay))

    def _run(self) -> None:
        while True:
            call, delay = self._calls.get()
            time.sleep(delay)
            self.flags[PUBLISHED] = call
            self.flags[FINISHED] = call
            while not reached(self.flags[DONE], call):
                time.sleep(1e-4)
            self.finished.append(call)

    def drain(self) -> None:
        """Waits for every given call (bounded, so that a test fails rather
        than hangs)."""
        self.wait_finished(len(self.given))

    def wait_finished(self, count: int) -> bool:
        deadline = time.monotonic() + PATIENCE_S
        while len(self.finished) < count and time.monotonic() < deadline:
            time.sleep(1e-3)
        return len(self.finished) >= count


def make_service(gpu: FakeGpu, out_words: int = SLOT_TOKENS * 2 * GROUP * DIM):
    slot = torch.zeros(SLOT_TOKENS * 2 * GROUP * DIM, dtype=torch.bfloat16)
    return CoattentionService(gpu.flags, raw_words(slot)[0], 1, np.zeros(out_words, np.float32),
                              np.zeros(SLOT_TOKENS * 2 * GROUP, np.float32), gpu.drain,
                              idle_cycles=10_000_000, report_interval_s=None,
                              serve_timeout_s=TIMEOUT_S)


def one_layer(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    layer = Layer(gen, 2, 1)
    table, seq_lens, starts = make_table(gen, [40], [1])
    step = tuple(x.reshape(-1).long().numpy() for x in (table, seq_lens, starts))
    return layer, step, (1, table.shape[1], 1)  # (requests, blocks, tokens) of a post


def test_a_raising_serving_thread_frees_the_gpu_and_fails_the_engine():
    gpu = FakeGpu()
    service = make_service(gpu, out_words=1)  # too small an output slot: the kernel raises
    layer, step, shape = one_layer()
    service.register([("a", layer.served)], [("t", step)])
    gpu.give(service.post("a", "t", *shape))
    assert gpu.wait_finished(1), "the GPU's wait was never freed"
    assert "the serving thread raised" in service.failure
    with pytest.raises(CoattentionFailure, match="cpu_attention"):
        service.post("a", "t", *shape)
    began = time.monotonic()
    service.stop()
    assert time.monotonic() - began < PATIENCE_S / 2


def test_a_stuck_call_is_given_up_after_the_bound(monkeypatch):
    release = threading.Event()

    def stuck(control, *args):  # a kernel that never returns (compiled: STOP set, it returns)
        if control[STOP]:
            return STOPPED
        release.wait()
        return STOPPED

    monkeypatch.setattr(coattention_service, "_serve", stuck)
    gpu = FakeGpu()
    service = make_service(gpu)
    layer, step, shape = one_layer()
    try:
        service.register([("a", layer.served)], [("t", step)])
        published = time.monotonic()
        gpu.give(service.post("a", "t", *shape))
        assert gpu.wait_finished(1), "the GPU's wait was never freed"
        waited = time.monotonic() - published
        assert TIMEOUT_S <= waited < PATIENCE_S / 2
        assert "not served" in service.failure
        with pytest.raises(CoattentionFailure):
            service.post("a", "t", *shape)
        service.stop()  # (the thread does not stop: stop() gives up on it)
    finally:
        release.set()


def test_stop_drops_a_call_never_published_and_forget_serves_a_published_one():
    gpu = FakeGpu()
    service = make_service(gpu)
    layer, step, shape = one_layer()
    service.register([("a", layer.served)], [("t", step)])
    service.post("a", "t", *shape)  # its layer's launch "failed": never published
    began = time.monotonic()
    service.stop()
    assert time.monotonic() - began < PATIENCE_S / 2, "stop() waited for an unpublished call"
    assert service.failure is None

    service.register([("b", layer.served)], [])  # a restart
    # Posted, and published only after forget(): the GPU will wait on it
    # (as where a collection inside a layer call, between its post and its
    # publication, ran a share's finalizer). forget() leaves it for the next
    # registration, which serves it before it lets the layers go.
    gpu.give(service.post("b", "t", *shape), delay=0.3)
    service.forget()
    service.register([("c", layer.served)], [("t", step)])
    assert gpu.finished == gpu.given, "the layers went before a call the GPU waits on was served"
    assert list(service.layers) == ["c"] and list(service.tables) == ["t"]
    gpu.give(service.post("c", "t", *shape))
    assert gpu.wait_finished(2)
    # Nothing in flight: forget() lets go at once.
    service.forget()
    assert not service.layers and not service.tables and service._thread is None
    assert service.failure is None
