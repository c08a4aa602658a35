"""Dual-batch overlap and micro-batching are refused at config resolution
while CPU co-attention is on (CUDA, cpu_attention not 'off'), naming both
settings; an engine cannot be started with them here (vLLM's CPU platform
turns dual-batch overlap off, and co-attention's handshake is CUDA's), so
the check is called as startup.resolve() calls it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_headinfer.config import HeadInferConfig, HeadInferConfigError
from vllm_headinfer.startup import check_microbatching


def parallel(enable_dbo=False, ubatch_size=0):
    return SimpleNamespace(enable_dbo=enable_dbo, ubatch_size=ubatch_size)


@pytest.mark.parametrize("raw,settings,named", [
    ({}, parallel(enable_dbo=True), "--enable-dbo"),
    ({"cpu_attention": 2}, parallel(ubatch_size=2), "--ubatch-size 2"),
])
def test_micro_batches_with_co_attention_are_refused(raw, settings, named):
    with pytest.raises(HeadInferConfigError) as refused:
        check_microbatching(HeadInferConfig.parse(raw), settings, is_cuda=True)
    message = str(refused.value)
    assert "additional_config.headinfer.cpu_attention" in message and named in message
    assert "'off'" in message


@pytest.mark.parametrize("raw,settings,is_cuda", [
    ({"cpu_attention": "off"}, parallel(enable_dbo=True), True),  # co-attention off
    ({}, parallel(enable_dbo=True), False),  # the CPU platform: no serving thread
    ({}, parallel(ubatch_size=1), True),  # one micro-batch is none
])
def test_accepted_without_both(raw, settings, is_cuda):
    check_microbatching(HeadInferConfig.parse(raw), settings, is_cuda)
