"""The process's co-attention on CUDA (coattention/runtime.py) around its
serving loop, without a GPU and without starting the loop: the CUDA state
made again where an engine needs larger slots or another query format (the
old loop closed and the GPU drained first), a failed loop's error raised
between steps and a forget left for later done there, and a new engine's
builders given a loop of their own after one failed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_headinfer.coattention import runtime as coattention_runtime
from vllm_headinfer.coattention.runtime import CoattentionRuntime
from vllm_headinfer.coattention.service import (FLAG_WORDS, SERVED, CoattentionFailure,
                                                CoattentionService)


def idle_service(drain=lambda: None) -> CoattentionService:
    """A service whose loop never started (nothing here compiles it)."""
    return CoattentionService(np.zeros(FLAG_WORDS, np.int32), np.zeros(8, np.int16), 1,
                              np.zeros(8, np.float32), np.zeros(2, np.float32), drain,
                              report_interval_s=None)


@pytest.fixture
def made(monkeypatch):
    """CudaCoattention replaced by one that records, in ``events``, what is
    done to each service it made."""
    events = []

    class Made:
        def __init__(self, query_dtype, slot_bytes, lse_bytes):
            self.query_dtype, self.slot_bytes = query_dtype, (slot_bytes, lse_bytes)
            self.service = SimpleNamespace(close=lambda: events.append(("close", self)),
                                           drain=lambda: events.append(("drain", self)),
                                           failure=None)

    monkeypatch.setattr(coattention_runtime, "CudaCoattention", Made)
    return events


def test_larger_slots_or_another_dtype_make_the_cuda_state_again(made):
    """A second engine reserving larger slots (a larger batch) gets slots of
    that size and a service made for them; the old service serves what was
    posted and the GPU drains before its pinned memory can go."""
    runtime = CoattentionRuntime()
    runtime.reserve(requests=4, batched_tokens=512, query_len=1, num_heads=8, head_size=64)
    first = runtime.slots(torch.bfloat16)
    assert first.slot_bytes == (4 * 8 * 64 * 4, 4 * 8 * 4)
    assert runtime.slots(torch.bfloat16) is first and not made
    # A smaller engine fits the slots made.
    runtime.reserve(requests=2, batched_tokens=512, query_len=1, num_heads=8, head_size=64)
    assert runtime.slots(torch.bfloat16) is first and not made
    runtime.reserve(requests=16, batched_tokens=512, query_len=1, num_heads=8, head_size=64)
    second = runtime.slots(torch.bfloat16)
    assert second.slot_bytes == (16 * 8 * 64 * 4, 16 * 8 * 4)
    assert made == [("close", first), ("drain", first)]
    third = runtime.slots(torch.float16)
    assert third is not second and made[-2:] == [("close", second), ("drain", second)]


def test_between_steps_a_failure_raises_and_a_forget_left_for_later_is_done():
    """Once failed, the next step raises even where it does not co-attend
    (a prefill): the builder asks before building any step, and there
    lets go of the layers a forget() left for later."""
    runtime = CoattentionRuntime()
    runtime.between_steps()  # (no serving loop yet: nothing to do)
    service = idle_service()
    runtime.cuda = SimpleNamespace(service=service)
    service.layers["a"] = 0
    service.posted = 1  # a call in flight: forget() leaves the layers for later
    service.forget()
    assert service.layers
    service.control[SERVED] = 1  # (served)
    runtime.between_steps()
    assert not service.layers
    service.failure = "HEADINFER CPU co-attention failed: test"
    with pytest.raises(CoattentionFailure, match="failed: test"):
        runtime.between_steps()


def test_a_new_engine_after_a_failure_gets_a_serving_loop_of_its_own():
    """The engine whose serving loop failed is dead (the failure's error
    ended it); the builders of the next engine in the process drop the
    failed loop, so that its first step neither raises the old error nor
    posts to a loop that serves nothing."""
    runtime = CoattentionRuntime()
    service = idle_service()
    runtime.cuda = SimpleNamespace(service=service)
    runtime.reserve(requests=4, batched_tokens=512, query_len=1, num_heads=8, head_size=64)
    assert runtime.cuda is not None, "a working loop is kept"
    service.failure = "HEADINFER CPU co-attention failed: test"
    runtime.reserve(requests=4, batched_tokens=512, query_len=1, num_heads=8, head_size=64)
    assert runtime.cuda is None
    runtime.between_steps()
