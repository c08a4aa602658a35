"""Runs one engine for the GPU tests and prints ``RESULT {json}``.

Usage: python engine_run.py '{"model": ..., "backend": "FLASH_ATTN"|"HEADINFER",
"resident": R, "dummy": bool, "prompt_lens": [...], "max_tokens": n}'
"""

import json
import os
import random
import sys


def main(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = {"attention_backend": spec["backend"]}
    if spec["backend"] == "HEADINFER":
        kwargs["additional_config"] = {
            "headinfer": {"resident_kv_heads": spec["resident"], **spec.get("headinfer", {})}
        }
    llm = LLM(
        spec["model"],
        dtype="bfloat16",
        load_format="dummy" if spec["dummy"] else "auto",
        skip_tokenizer_init=True,
        max_model_len=4096,
        max_num_batched_tokens=512,
        gpu_memory_utilization=0.3,
        enforce_eager=spec.get("eager", True),
        seed=0,
        **kwargs,
    )
    rng = random.Random(1)
    vocab = spec.get("vocab", 2000)
    prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(n)]}
               for n in spec["prompt_lens"]]
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=1,
                            ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append({
            "token_ids": list(c.token_ids),
            "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
        })
    return {"outputs": result}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
