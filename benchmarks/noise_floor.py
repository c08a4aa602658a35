"""FLASH_ATTN against itself on the GPU exactness checks' model and prompts
(tests/gpu/engine_compare.py): the run-to-run noise that HEADINFER's
exactness is judged within, per KV cache dtype. The reference is compiled
with CUDA graphs and prefill chunks of 512 tokens (as test_fp8_cache's);
the others change one thing each: eager attention, chunks of 256 and of
2048 tokens. Prints and writes, per case, the prompts whose greedy tokens
diverge, the reference's margin at each divergence and the largest logprob
difference before it.

Usage: python benchmarks/noise_floor.py --out floor.json [--dtypes auto,fp8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "gpu"))
from engine_compare import build_small_model, differences, run_engine, spec  # noqa: E402

VARIANTS = {"eager": {"eager": True}, "chunk 256": {"batched_tokens": 256},
            "chunk 2048": {"batched_tokens": 2048}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtypes", default="auto,fp8")
    args = parser.parse_args()
    model = build_small_model(Path(tempfile.mkdtemp()))
    results = {}
    for dtype in args.dtypes.split(","):
        common = dict(dummy=False, kv_cache_dtype=dtype)
        ref = run_engine(spec(model, "FLASH_ATTN", None, eager=False, **common))
        for name, change in VARIANTS.items():
            got = run_engine(spec(model, "FLASH_ATTN", None, **{"eager": False, **common, **change}))
            results[f"{dtype} {name}"] = differences(ref, got)
            print(f"FLASH_ATTN {dtype}, graphs/512 against {name}: {results[f'{dtype} {name}']}",
                  flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
