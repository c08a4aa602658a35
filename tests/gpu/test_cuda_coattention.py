"""CPU co-attention on CUDA against FLASH_ATTN (skipped without a GPU and
CUDA vLLM): the small model of engine_compare with cpu_attention 2 (R = 0: two
of the four offloaded heads on the CPU kernel, two read by the GPU over the
link; R = 2: both offloaded heads on the CPU) and "auto" (the startup
measurement's split, which may turn it off on this host), eager and compiled
with CUDA graphs. The CPU kernel attends in float32 and flash attention in
bf16 with its own KV splits, and co-attention steps run attention between
piecewise graphs where FLASH_ATTN's decode steps run in full graphs, so
near-ties of the reference may flip (``engine_compare.compare``).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from engine_compare import compare_each, run_engine, small_model, spec  # noqa: E402, F401


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
def test_matches_flash_attn(small_model, eager):
    ref = run_engine(spec(small_model, "FLASH_ATTN", None, dummy=False, eager=eager))
    cases, calls = [], {}
    for resident in (0, 2):
        for cpu in (2, "auto"):
            got = dict(run_engine(spec(small_model, "HEADINFER", resident, dummy=False, eager=eager,
                                       coattention_calls=True, headinfer={"cpu_attention": cpu})))
            label = f"R={resident} cpu_attention={cpu} eager={eager}"
            calls[label] = got.pop("coattention_calls")
            cases.append((label, ref, got))
    print(calls)
    compare_each(cases, near_ties=True)
    for resident in (0, 2):
        label = f"R={resident} cpu_attention=2 eager={eager}"
        assert calls[label].get("decode", 0) > 0, f"{label}: the CPU kernel never ran: {calls[label]}"
