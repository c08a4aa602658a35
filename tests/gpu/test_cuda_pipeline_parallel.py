"""HEADINFER under pipeline parallelism on CUDA, against FLASH_ATTN at the
same parallel sizes, compared as ``engine_compare.compare`` explains, on the
small random Llama (4 layers, 4 KV heads).

* PP = 2 on two GPUs: each stage places and pools its own two layers. mp
  runs R = 0, R = 2, a per-layer list (each stage takes its layers' counts
  by name) and auto placement from a device budget that keeps 3 of a
  stage's 8 head-layers resident; Ray runs R = 1.
* TP = 2 x PP = 2 on four GPUs with Ray: two KV heads per rank, R = 0 and 1.

The in-process engine core adds every request before the first step, so both
backends see the same batches (as in the TP tests); the summary printed says
whether outputs are also bit-identical.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from engine_compare import (  # noqa: E402
    EXECUTORS,
    STAGING_MIB,
    compare_each,
    needs_gpus,
    run_engine,
    small_model,  # noqa: F401 - fixture
    spec,
    uneven_budget,
)


def engine(model: str, backend: str, resident, tp: int, pp: int, executor: str,
           **extra) -> dict:
    return run_engine(spec(model, backend, resident, dummy=False, tp=tp, pp=pp,
                           executor=executor, **extra))


@needs_gpus(2)
@pytest.mark.parametrize("executor", EXECUTORS)
def test_pp2(small_model, executor):
    ref = engine(small_model, "FLASH_ATTN", None, tp=1, pp=2, executor="mp")
    if executor == "ray":
        cases = [("PP=2 ray R=1", engine(small_model, "HEADINFER", 1, 1, 2, "ray"))]
    else:
        cases = [(f"PP=2 mp R={resident}", engine(small_model, "HEADINFER", resident, 1, 2, "mp"))
                 for resident in (0, 2, [3, 0, 2, 1])]
        cases.append(("PP=2 mp auto (3 of a stage's 8 head-layers resident)", engine(
            small_model, "HEADINFER", "auto", 1, 2, "mp",
            kv_cache_memory_bytes=uneven_budget(3),
            headinfer={"staging_mib": STAGING_MIB, "cpu_kv_gib": 1})))
    compare_each([(label, ref, got) for label, got in cases])


@needs_gpus(4)
def test_tp2_pp2_ray(small_model):
    ref = engine(small_model, "FLASH_ATTN", None, tp=2, pp=2, executor="mp")
    compare_each([(f"TP=2 x PP=2 ray R={resident}/2", ref,
                   engine(small_model, "HEADINFER", resident, 2, 2, "ray"))
                  for resident in (0, 1)])
