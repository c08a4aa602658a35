"""CPU co-attention's serving thread (coattention_service) against a GPU
played by a Python thread: it publishes each call's queries through the
handshake words as the CUDA stream does, waits for DONE and reads the
outputs, which must equal the kernel's own call on the same inputs. Calls
come from two layers (one with a split head) over two step-metadata tables,
numbered across 2**32 (the words compare cyclically), with pauses that put
the thread to sleep, and a layer registered late (a restart)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from vllm_headinfer.coattention_service import (DONE, POSTED, PUBLISHED, SERVED,
                                                CoattentionService, ServedLayer, reached)
from vllm_headinfer.cpu_coattention import decode_attention, flat_pages, head_scales, raw_words

GROUP, DIM, BLOCK, SLOT_TOKENS = 2, 64, 16, 8


def make_layer(gen, heads, split_keep, blocks=64):
    pages = torch.randn(blocks, heads + 1, 2, BLOCK, DIM, generator=gen).to(torch.bfloat16)
    cpu_pages = pages[:, 1:]  # the CPU's heads are the pool's last ones
    flat, block_stride, head_stride = flat_pages(cpu_pages)
    served = ServedLayer(flat, block_stride, head_stride, BLOCK, 1, heads, GROUP, DIM, split_keep,
                         2, DIM**-0.5, head_scales(heads, 1.0, 1.0))
    return cpu_pages, served


def make_table(gen, seq_lens, query_lens, blocks=64):
    width = max(math.ceil(n / BLOCK) for n in seq_lens)
    table = torch.randperm(blocks, generator=gen)[: len(seq_lens) * width].view(len(seq_lens), width)
    starts = torch.tensor([0, *np.cumsum(query_lens)])
    return table, torch.tensor(seq_lens), starts


def expected(query, pages, step, split_keep):
    table, seq_lens, starts = step
    tokens, heads = query.shape[0], pages.shape[1]
    out = torch.empty(tokens, heads * GROUP, DIM)
    split_out = torch.empty(tokens, GROUP, DIM)
    split_lse = torch.empty(GROUP, tokens)
    decode_attention(query, pages, table, seq_lens, starts, DIM**-0.5,
                     out[:, GROUP:] if split_keep else out, threads=2, split_keep=split_keep,
                     split_out=split_out, split_lse=split_lse)
    if split_keep:
        out[:, :GROUP] = split_out
    return out


@pytest.mark.parametrize("first_call", [0, 2**32 - 3])
def test_served_calls_equal_the_kernels(first_call):
    gen = torch.Generator().manual_seed(0)
    layers = {"a": make_layer(gen, 2, 0), "b": make_layer(gen, 2, 8), "c": make_layer(gen, 1, 0)}
    tables = {"t0": make_table(gen, [100, 37], [1, 1]), "t1": make_table(gen, [250, 9, 64], [2, 1, 3])}
    flags = np.zeros(32, np.int32)
    slot = torch.empty(SLOT_TOKENS * 2 * GROUP * DIM, dtype=torch.bfloat16)
    out = np.zeros(SLOT_TOKENS * 2 * GROUP * DIM, np.float32)
    lse = np.zeros(SLOT_TOKENS * 2 * GROUP, np.float32)
    posted = []  # (call, layer, table) in the order the "stream" runs them
    gpu_done = threading.Event()
    results, errors = [], []

    def drain():  # the GPU finishes every posted call
        while len(results) + len(errors) < len(posted):
            threading.Event().wait(1e-3)

    service = CoattentionService(flags, raw_words(slot)[0], 1, out, lse, drain,
                                 idle_cycles=1_000_000)
    service.posted = first_call
    service.control[[POSTED, SERVED]] = first_call
    flags[[PUBLISHED, DONE]] = np.int64(first_call).astype(np.int32)

    def gpu():
        done = 0
        while done < len(schedule):
            while done >= len(posted):
                threading.Event().wait(1e-4)
            call, name, table = posted[done]
            query = queries[done]
            slot[: query.numel()] = query.reshape(-1)
            flags[PUBLISHED] = np.int64(call).astype(np.int32)
            while not reached(flags[DONE], call):
                pass
            tokens, heads = query.shape[0], layers[name][1].heads
            rows = tokens * heads * GROUP
            got = torch.from_numpy(out[: rows * DIM].copy()).view(tokens, heads * GROUP, DIM)
            want = expected(query, layers[name][0], tables[table], layers[name][1].split_keep)
            if torch.allclose(got, want, atol=1e-5, rtol=1e-5):
                results.append(call)
            else:
                errors.append((call, name, table, (got - want).abs().max()))
            done += 1
        gpu_done.set()

    schedule = [("a", "t0"), ("b", "t0"), ("a", "t1"), ("b", "t1"), ("c", "t1"), ("a", "t0")]
    queries = [torch.randn(int(tables[t][2][-1]), layers[n][1].heads * GROUP, DIM,
                           generator=gen).to(torch.bfloat16) for n, t in schedule]
    service.register([(name, layers[name][1]) for name in "ab"],
                     [(name, tuple(x.reshape(-1).long().numpy() for x in step))
                      for name, step in tables.items()])
    thread = threading.Thread(target=gpu)
    thread.start()
    for i, (name, table) in enumerate(schedule):
        if name == "c":  # a late layer: the loop restarts after the GPU drained
            service.register([(name, layers[name][1])], [])
        if i == 3:  # a pause long enough for the loop to sleep
            threading.Event().wait(0.3)
        table_, seq_lens, starts = tables[table]
        call = service.post(name, table, len(seq_lens), table_.shape[1], int(starts[-1]))
        posted.append((call, name, table))
    assert gpu_done.wait(120), "the serving thread stopped answering"
    service.stop()
    assert not errors, errors
    assert [c for c, _, _ in posted] == [first_call + i + 1 for i in range(len(schedule))]
