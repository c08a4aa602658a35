"""Runs one engine for the GPU tests and prints ``RESULT {json}``.

Usage: python engine_run.py '{"model": ..., "backend": "FLASH_ATTN"|"HEADINFER",
"resident": R, "dummy": bool, "prompt_lens": [...], "max_tokens": n}'
"resident" is what resident_kv_heads takes (an integer, a per-layer list or
"auto"). Optional keys: "eager" (default true), "headinfer" (more settings),
"tp" (tensor_parallel_size, default 1), "pp" (pipeline_parallel_size,
default 1), "executor" ("mp" or "ray", default
vLLM's choice), "kv_cache_memory_bytes" (the device KV budget instead of 0.3
of the GPU), "speculative" (a speculative_config), "kv_cache_dtype", "batched_tokens" (the prefill chunk, default
512), "periodic" (prompts that
repeat a 7-token pattern, so prompt lookup finds drafts), "coattention_calls"
(also report the CPU co-attention kernel's layer calls by step kind; the
engine core runs in this process), "retune" (auto co-attends every step and
retunes its split from windows of 0.1 ms of kernel time; also reports how
often the rates in force changed and the shapes of the shares served),
"second_engine" (the engine is shut down and what it left in this process
reported, then a second engine of the same spec runs and is shut down: its
result, with what it left, as "second"), "kill_coattention_after" (CPU
co-attention's serving thread is killed once the kernel has served this many
decode layer calls: the result says whether generate() raised, its message,
and how many seconds after the kill).
"""

import faulthandler
import json
import os
import random
import sys
import threading
import time


def main(spec: dict) -> dict:
    """One engine's result, or with "second_engine" the first's with the
    second's under "second"."""
    if not spec.get("second_engine"):
        return run(spec)[1]
    results = []
    for _ in range(2):
        llm, result = run(spec)
        llm.llm_engine.engine_core.shutdown()
        del llm
        result.update(left_behind())
        results.append(result)
    return {**results[0], "second": results[1]}


def run(spec: dict):
    """The engine of ``spec`` and its result."""
    from vllm import LLM, SamplingParams

    if spec.get("retune"):
        from vllm_headinfer.coattention import split as coattention_split
        from vllm_headinfer.coattention import tuning as coattention_tuning

        coattention_split.MIN_CPU_SHARE_S = 0.0
        coattention_tuning.RETUNE_WINDOW_S = 1e-4

    kwargs = {"attention_backend": spec["backend"]}
    if spec["backend"] == "HEADINFER":
        # A host budget of a few GiB holds these prompts many times over; the
        # default (half the free RAM) would pin far more and leave less for
        # engines that run beside this one.
        # CPU co-attention off unless a test sets it: its kernel rounds
        # differently from flash attention, which bit-exact comparisons with
        # FLASH_ATTN would see.
        kwargs["additional_config"] = {"headinfer": {
            "resident_kv_heads": spec["resident"], "cpu_kv_gib": 4, "cpu_attention": "off",
            **spec.get("headinfer", {})}}
    llm = LLM(
        spec["model"],
        dtype="bfloat16",
        load_format="dummy" if spec["dummy"] else "auto",
        skip_tokenizer_init=True,
        max_model_len=4096,
        max_num_batched_tokens=spec.get("batched_tokens", 512),
        **({"kv_cache_memory_bytes": spec["kv_cache_memory_bytes"]}
           if spec.get("kv_cache_memory_bytes") else {"gpu_memory_utilization": 0.3}),
        enforce_eager=spec.get("eager", True),
        tensor_parallel_size=spec.get("tp", 1),
        pipeline_parallel_size=spec.get("pp", 1),
        distributed_executor_backend=spec.get("executor"),
        speculative_config=spec.get("speculative"),
        kv_cache_dtype=spec.get("kv_cache_dtype", "auto"),
        seed=0,
        **kwargs,
    )
    # A crash in native code then names the Python line of every thread
    # (enabled here: libraries loaded with the engine install their own
    # SIGSEGV handlers, which print no Python frames).
    faulthandler.enable(all_threads=True)
    rng = random.Random(1)
    vocab = spec.get("vocab", 2000)
    def tokens(n: int) -> list[int]:
        if spec.get("periodic"):
            pattern = [rng.randrange(3, vocab) for _ in range(7)]
            return (pattern * (n // 7 + 1))[:n]
        return [rng.randrange(3, vocab) for _ in range(n)]

    prompts = [{"prompt_token_ids": tokens(n)} for n in spec["prompt_lens"]]
    # Two logprobs per step give the margin between the best two tokens;
    # prompt logprobs score every prompt position on identical inputs.
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=2,
                            prompt_logprobs=1, ignore_eos=True)
    if spec.get("kill_coattention_after"):
        return llm, killed_mid_decode(llm, prompts, params, spec["kill_coattention_after"])
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for prompt, o in zip(prompts, outs):
        c = o.outputs[0]
        steps = [sorted((v.logprob for v in lp.values()), reverse=True) for lp in c.logprobs]
        result.append({
            "token_ids": list(c.token_ids),
            "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
            "margins": [s[0] - s[1] if len(s) > 1 else None for s in steps],
            "prompt_logprobs": [
                None if lp is None else lp[t].logprob
                for t, lp in zip(prompt["prompt_token_ids"], o.prompt_logprobs)
            ],
        })
    extra = {}
    if spec.get("coattention_calls"):
        from vllm_headinfer.coattention.share import CALLS

        extra["coattention_calls"] = dict(CALLS)
    if spec.get("retune"):
        from vllm_headinfer.coattention.runtime import process_coattention

        service = process_coattention.service
        served = service._layer_list if service is not None else []
        extra["retunes"] = process_coattention.tuning.version
        extra["shares_served"] = sorted({(x.heads, x.split_keep) for x in served})
    return llm, {"outputs": result, **extra}


def killed_mid_decode(llm, prompts, params, calls: int) -> dict:
    """generate() with CPU co-attention's serving thread killed once the
    kernel has served ``calls`` decode layer calls. The kill is the loop's
    own stop word set behind the service's back: the thread returns as if
    stopped, and the calls the GPU has published or will publish are never
    served, which is what a dead thread leaves (the service's watchdog must
    find it)."""
    from vllm_headinfer.coattention.runtime import process_coattention
    from vllm_headinfer.coattention.service import STOP
    from vllm_headinfer.coattention.share import CALLS

    killed = {}

    def kill():
        while CALLS["decode"] < calls:
            time.sleep(1e-3)
        process_coattention.service.control[STOP] = 1
        killed["at"] = time.monotonic()

    threading.Thread(target=kill, daemon=True).start()
    try:
        llm.generate(prompts, params, use_tqdm=False)
    except Exception as error:  # (what vLLM makes of the engine's error)
        return {"raised": True, "message": f"{type(error).__name__}: {error}",
                "seconds_after_kill": time.monotonic() - killed.get("at", float("nan"))}
    return {"raised": False, "killed": "at" in killed, "decode_calls": CALLS["decode"]}


def left_behind() -> dict:
    """What an engine shut down in this process left: host pools still
    mapped, layers CPU co-attention's serving thread still holds, and the
    process's resident memory (a pool kept would stay resident)."""
    import gc

    import psutil
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from vllm_headinfer.coattention.runtime import process_coattention
    from vllm_headinfer.host_pool import HostKVPool

    gc.collect()
    cleanup_dist_env_and_memory()
    pools = [o for o in gc.get_objects() if isinstance(o, HostKVPool) and o.tensor.numel()]
    service = process_coattention.service
    return {"pools_left": len(pools),
            "layers_served_left": len(service.layers) if service is not None else 0,
            "rss_bytes": psutil.Process().memory_info().rss}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    # The engine core in this process: generate() adds every request before
    # the first step, so the batches (and flash attention's per-batch KV-split
    # plans) are the same in every run. A separate engine-core process starts
    # stepping while requests still arrive, which makes batches, and the last
    # bits of bf16 outputs, depend on timing.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    spec = json.loads(sys.argv[1])
    print("RESULT " + json.dumps(main(spec)), flush=True)
    if spec.get("kill_coattention_after"):
        os._exit(0)  # (the engine is dead: no orderly shutdown to wait for)
