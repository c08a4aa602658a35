"""HEADINFER under tensor parallelism and Ray-launched workers on CUDA.

* One GPU: the Ray executor at TP = 1 gives the same tokens as the mp
  executor, logprobs within bf16 tolerance (both engines step in-process
  over the same batches, so they should also be bit-identical; the summary
  printed says whether they are).
* Two GPUs: HEADINFER with the mp and the Ray executor against FLASH_ATTN
  at the same TP size, compared as ``engine_compare.compare`` explains, on
  the small random Llama (4 KV heads: two per rank), a 2-KV-head variant
  (one KV head per rank, R = 0) and the Llama-3-8B shape (8 KV heads: four
  per rank). mp runs R = 0 and a head split (R = 1 of 2, R = 0 of 4); Ray
  runs the head splits, R = 1 of 2 and R = 2 of 4. R = H per rank attends on
  device pages only and is covered on one GPU.
* Four GPUs: the small Llama with one KV head per rank (R = 0 and 1, both
  executors) and the 8B shape with two (R = 0, 1, 2 and auto placement).

Ray workers load the plugin through vLLM's entry points like every other
vLLM process; nothing here imports it for them.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from engine_compare import (  # noqa: E402
    EXECUTORS,
    STAGING_MIB,
    compare,
    compare_each,
    needs_gpus,
    needs_ray,
    run_engine,
    shaped_model,  # noqa: F401 - fixture
    small_model,  # noqa: F401 - fixture
    spec,
    uneven_budget,
)


@pytest.fixture(scope="module")
def small_model_2kv(tmp_path_factory):
    from vllm_headinfer.tiny_model import build_tiny_model

    return str(build_tiny_model(
        tmp_path_factory.mktemp("small2kv") / "llama", "llama", num_layers=4, num_heads=8,
        num_kv_heads=2, head_dim=128, vocab_size=2048, dtype="bfloat16",
    ))


def headinfer(model: str, resident, tp: int, executor: str, dummy: bool = False,
              **extra) -> dict:
    return run_engine(spec(model, "HEADINFER", resident, dummy=dummy, tp=tp, executor=executor,
                           **extra))


def flash_attn(model: str, tp: int, dummy: bool = False) -> dict:
    return run_engine(spec(model, "FLASH_ATTN", None, dummy=dummy, tp=tp, executor="mp"))


@needs_ray
def test_ray_matches_mp_at_tp1(small_model):
    mp = headinfer(small_model, 1, tp=1, executor="mp")
    ray = headinfer(small_model, 1, tp=1, executor="ray")
    for i, (a, b) in enumerate(zip(mp["outputs"], ray["outputs"])):
        assert a["token_ids"] == b["token_ids"], f"prompt {i}: Ray's tokens differ from mp's"
    print(f"TP=1 Ray vs mp: {compare(mp, ray)}")


@needs_gpus(2)
@pytest.mark.parametrize("executor", EXECUTORS)
def test_tp2_small_models(small_model, small_model_2kv, executor):
    ref = flash_attn(small_model, tp=2)
    cases = [(f"TP=2 {executor} R={resident}/2", ref,
              headinfer(small_model, resident, tp=2, executor=executor))
             for resident in ((0, 1) if executor == "mp" else (1,))]
    cases.append((f"TP=2 {executor} one KV head per rank, R=0", flash_attn(small_model_2kv, tp=2),
                  headinfer(small_model_2kv, 0, tp=2, executor=executor)))
    compare_each(cases, bitwise=True)


@needs_gpus(2)
@pytest.mark.parametrize("executor", EXECUTORS)
def test_tp2_8b_shape_logprobs(shaped_model, executor):
    ref = flash_attn(shaped_model, tp=2, dummy=True)
    compare_each([
        (f"8B shape TP=2 {executor} R={resident}/4", ref,
         headinfer(shaped_model, resident, tp=2, executor=executor, dummy=True))
        for resident in ((0,) if executor == "mp" else (2,))
    ])


@needs_gpus(4)
@pytest.mark.parametrize("executor", EXECUTORS)
def test_tp4_one_kv_head_per_rank(small_model, executor):
    ref = flash_attn(small_model, tp=4)
    compare_each([(f"TP=4 {executor} R={resident}/1", ref,
                   headinfer(small_model, resident, tp=4, executor=executor))
                  for resident in (0, 1)], bitwise=True)


@needs_gpus(4)
def test_tp4_8b_shape(shaped_model):
    """The 8B shape at TP = 4: two KV heads per rank, R = 0, 1, 2 and auto
    placement from a device budget that keeps 3 of a rank's 8 head-layers
    resident (layers with different counts)."""
    ref = flash_attn(shaped_model, tp=4, dummy=True)
    auto = headinfer(shaped_model, "auto", tp=4, executor="mp", dummy=True,
                     kv_cache_memory_bytes=uneven_budget(3),
                     headinfer={"staging_mib": STAGING_MIB, "cpu_kv_gib": 1})
    compare_each([
        *((f"8B shape TP=4 mp R={resident}/2", ref,
           headinfer(shaped_model, resident, tp=4, executor="mp", dummy=True))
          for resident in (0, 1, 2)),
        ("8B shape TP=4 mp auto (3 of 8 head-layers resident)", ref, auto),
    ])
