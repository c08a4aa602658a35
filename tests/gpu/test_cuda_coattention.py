"""CPU co-attention on CUDA against FLASH_ATTN (skipped without a GPU and
CUDA vLLM): the small model of engine_compare with cpu_attention 2 (R = 0: two
of the four offloaded heads on the CPU kernel, two read by the GPU over the
link; R = 2: both offloaded heads on the CPU), 1.5 (a split head: the GPU
attends the first half of each request's blocks with flash attention, the
kernel the rest, merged by vLLM's merge of partial attentions) and "auto" (the startup
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

from engine_compare import compare, run_engine, small_model, spec  # noqa: E402, F401


@pytest.mark.parametrize("cpu", [2, 1.5, "auto"], ids=["cpu2", "cpu1.5", "cpuauto"])
@pytest.mark.parametrize("resident", [0, 2], ids=["R0", "R2"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
def test_matches_flash_attn(small_model, eager, resident, cpu):
    """One case per test id (the FLASH_ATTN reference is run once per
    ``eager``), so a short device lease can select the cases it has time for."""
    ref = run_engine(spec(small_model, "FLASH_ATTN", None, dummy=False, eager=eager))
    got = dict(run_engine(spec(small_model, "HEADINFER", resident, dummy=False, eager=eager,
                               coattention_calls=True, headinfer={"cpu_attention": cpu})))
    calls = got.pop("coattention_calls")
    print(f"R={resident} cpu_attention={cpu} eager={eager}: kernel calls {calls}")
    print(compare(ref, got, near_ties=True))
    if cpu != "auto":
        assert calls.get("decode", 0) > 0, f"the CPU kernel never ran: {calls}"


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
def test_retuned_split_matches_flash_attn(small_model, eager):
    """Auto co-attending every step, its split retuned from windows of the
    engine's own calls (0.1 ms of kernel time each, where serving takes
    0.5 s): the layers' shares resized between steps stay exact."""
    import os

    from vllm_headinfer.coattention.split import MIN_CORES_PER_RANK

    if len(os.sched_getaffinity(0)) < MIN_CORES_PER_RANK:
        pytest.skip(f"auto co-attention needs {MIN_CORES_PER_RANK} cores")
    ref = run_engine(spec(small_model, "FLASH_ATTN", None, dummy=False, eager=eager))
    got = dict(run_engine(spec(small_model, "HEADINFER", 0, dummy=False, eager=eager,
                               coattention_calls=True, retune=True,
                               headinfer={"cpu_attention": "auto"})))
    calls, changes, shares = (got.pop(k) for k in ("coattention_calls", "retunes",
                                                   "shares_served"))
    print(f"retuned auto, eager={eager}: kernel calls {calls}, rate changes {changes}, "
          f"shares served (heads, split_keep) {shares}")
    print(compare(ref, got, near_ties=True))
    assert calls.get("decode", 0) > 0, f"the CPU kernel never ran: {calls}"
    assert changes >= 1
    # Short contexts read far below the startup probe's rate: the first
    # split tried is smaller.
    assert len(shares) > 1, f"no share was resized: {shares}"


def test_a_second_engine_leaves_nothing_of_the_first(small_model):
    """Two co-attending engines one after the other in one process: once
    each is shut down, none of its host pools stays mapped, the serving
    thread holds none of its layers and the process's resident memory is
    back where it was (a pool kept would stay resident: cpu_kv_gib 4); the
    second serves as the first did."""
    got = run_engine(spec(small_model, "HEADINFER", 0, dummy=False, coattention_calls=True,
                          second_engine=True, headinfer={"cpu_attention": 2}))
    second = got["second"]
    first_calls = got["coattention_calls"].get("decode", 0)
    assert 0 < first_calls < second["coattention_calls"].get("decode", 0), (
        got["coattention_calls"], second["coattention_calls"])  # (the count is the process's)
    for left in (got, second):
        assert (left["pools_left"], left["layers_served_left"]) == (0, 0), left
    assert second["rss_bytes"] - got["rss_bytes"] < (256 << 20), (
        got["rss_bytes"] >> 20, second["rss_bytes"] >> 20)
    assert [o["token_ids"] for o in second["outputs"]] == [o["token_ids"] for o in got["outputs"]]


def test_a_killed_serving_thread_fails_the_engine_within_seconds(small_model):
    """CPU co-attention's serving thread killed mid-decode: instead of the
    GPU waiting without end on a word the thread will never write, the
    service's watchdog gives the wait up after SERVE_TIMEOUT_S and the next
    step raises, naming co-attention, which fails generate()."""
    from vllm_headinfer.coattention.service import SERVE_TIMEOUT_S

    got = run_engine(spec(small_model, "HEADINFER", 0, dummy=False, max_tokens=512,
                          kill_coattention_after=40, headinfer={"cpu_attention": 2}))
    print(got)
    assert got["raised"], f"generate() finished despite the dead serving thread: {got}"
    assert "HEADINFER CPU co-attention failed" in got["message"], got["message"]
    assert got["seconds_after_kill"] < SERVE_TIMEOUT_S + 10, got
