"""Speculative decoding (vLLM's ``ngram`` prompt lookup) against plain decode at
long context, for HEADINFER with every KV head offloaded (``R0``) and for
FLASH_ATTN, on a Llama-3-8B-shaped model with dummy weights. On a CUDA host with
vLLM 0.32.0 and this plugin installed:

    python3 benchmarks/bench_speculative.py --out $OUT/spec.json

An R0 decode step is bound by reading the offloaded KV once over the PCIe link;
a verify step of 1+k tokens reads the same bytes, so it should cost about what a
decode step costs, and each accepted draft token is nearly free.

Workloads (``--workload``):

* ``edit`` (default): editing a document. The model is built so that its
  greedy output is a fixed chain C of 2,048 distinct token ids (100000..127999):
  after the dummy weights load, every layer's output projections (``o_proj``,
  ``down_proj``) are zeroed, so the residual stream at the last layer is the
  input token's embedding, and the LM head row of C[i + 1] is set to the
  embedding of C[i]; attention still computes and reads every KV byte, so a
  step costs what the 8B shape's step costs. The prompt is ``--context``
  random ids (1000..99999, seed 0) holding C early on as a passage P with
  every ``--edit-every``-th token after the first 48 replaced by a random id,
  and ending with C's first 32 tokens (the request to rewrite P). The output
  continues C: prompt lookup finds P and proposes its next tokens, which are
  accepted up to the next edit; the step after an edit has no n-gram match
  (the edited token is not in the prompt), so drafting resumes two tokens
  later. Acceptance thus comes from the output repeating the prompt's
  passage, the reason it holds for real text, with a rate set by the edits.
  The engine core runs in the benchmark process (``apply_model`` builds the
  chain in place).
* ``cycle``: the same prompt with C = random ids, a plain dummy-weight model.
  It does not continue P: under greedy decoding it falls into a two-token
  cycle, which prompt lookup predicts from the generated tokens themselves,
  so acceptance says nothing about real text (runs 10-12 used it).

A 256-token request of the same kind runs first (warm-up: the proposer's
kernel compiles at its first drafting step), then the timed request decodes
``--decode-tokens`` greedy tokens. The figure that does not depend on
acceptance is the verify step cost ratio: time per verify step (spec) / per
decode step (plain).

Per configuration, each in a fresh process: prefill and decode seconds (vLLM's
request timestamps: scheduled -> first token -> last token), decode tokens/s,
and, from ``LLM.get_metrics()`` deltas over the timed request, drafts, draft
tokens, accepted tokens (``vllm:spec_decode_num_*``) and engine steps. Steps
come from the ``vllm:inter_token_latency_seconds`` histogram (one observation
per step that returned tokens) because a step without an n-gram match counts no
draft, and accepted tokens include drafts cut off by max_tokens. Mean acceptance
length = 1 + accepted / drafts. Each plain / +ngram pair gets the tokens/s
speedup and the verify step cost ratio; "link GB/s" is offloaded KV bytes per
step / step time. Pinned H2D bandwidth is measured once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_headinfer as base_bench  # model shape, config kwargs, H2D probe

PASSAGE, CUE, PASSAGE_START = 2048, 32, 1024
SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")
STEP_HISTOGRAM = "vllm:inter_token_latency_seconds"


def parse_config(name: str) -> tuple[str, int]:
    """Config name to (base, k): "R0+ngram4" -> ("R0", 4), "FLASH_ATTN" -> ("FLASH_ATTN", 0)."""
    base, _, spec = name.partition("+")
    m = re.fullmatch(r"ngram(\d+)", spec) if spec else None
    if (spec and not m) or not re.fullmatch(r"FLASH_ATTN|auto|R\d+", base):
        raise ValueError(f"bad config name {name!r}: want FLASH_ATTN, auto or R<n>, optionally +ngram<k>")
    return base, int(m.group(1)) if m else 0


def engine_kwargs(name: str, cpu_kv_gib: float | None) -> dict:
    base, k = parse_config(name)
    kwargs = base_bench.config_kwargs(base, cpu_kv_gib)
    if k:
        kwargs["speculative_config"] = {"method": "ngram", "num_speculative_tokens": k,
                                        "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    return kwargs


CHAIN_TOKENS = (100000, 128000)  # C's ids: apart from the prompt's random ids
PASSAGE_KEPT = 48  # P's first tokens are never edited (the cue and a little more)


def chain(seed: int = 0) -> list[int]:
    """C: PASSAGE distinct token ids, the edit model's output."""
    return random.Random(seed).sample(range(*CHAIN_TOKENS), PASSAGE)


def build_prompt(context: int, seed: int = 0, edit_every: int = 0) -> list[int]:
    """Random document with passage P early and P's first tokens at the end.
    With ``edit_every`` P is C with every ``edit_every``-th token (after the
    first PASSAGE_KEPT) replaced; without, P is random ids."""
    rng = random.Random(seed)
    tokens = [rng.randrange(1000, 100000) for _ in range(context)]
    # Short contexts (smoke runs, the warm-up) shrink the passage to fit.
    start, plen = min(PASSAGE_START, context // 8), min(PASSAGE, context // 4)
    cue = min(CUE, plen)
    if edit_every:
        ids = chain()
        passage = [c if i < PASSAGE_KEPT or i % edit_every else rng.randrange(1000, 100000)
                   for i, c in enumerate(ids[:plen])]
        tokens[start:start + plen] = passage
        tokens[context - cue:] = ids[:cue]
    else:
        tokens[context - cue:] = tokens[start:start + cue]  # P = tokens[start:start + plen]
    return tokens


def build_chain_model(model) -> None:
    """The edit workload's model, in place (see the module docstring): the
    greedy successor of C[i] is C[i + 1] whatever the context. After the final
    RMSNorm the embedding of C[i] has norm sqrt(hidden), so C[i + 1]'s logit
    exceeds every other row's (random, of similar norm) by a factor of about
    sqrt(hidden) / 5: no near-ties."""
    import torch

    ids = chain()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        model.model.norm.weight.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        src = torch.tensor(ids[:-1], device=embed.device)
        head[torch.tensor(ids[1:], device=head.device)] = embed[src].to(head.device)
        # vLLM's CPU build computes linear layers with a packed copy of their
        # weights (smoke runs there): pack the changed weights again.
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        for module in model.modules():
            if hasattr(module, "cpu_linear"):
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)


def model_len(context: int, decode_tokens: int) -> int:
    return -(-(context + decode_tokens + 64) // 16) * 16


def metric_totals(llm) -> dict:
    """Spec-decode counters and the step histogram's count, summed over engines."""
    from vllm.v1.metrics.reader import Counter, Histogram

    out = {name: 0 for name in SPEC_COUNTERS} | {"steps": 0}
    for m in llm.get_metrics():
        if isinstance(m, Counter) and m.name in SPEC_COUNTERS:
            out[m.name] += m.value
        elif isinstance(m, Histogram) and m.name == STEP_HISTOGRAM:
            out["steps"] += m.count
    return out


def timed_request(llm, prompt: list[int], decode_tokens: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens + 1, ignore_eos=True)
    before = metric_totals(llm)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    after = metric_totals(llm)
    delta = {k: after[k] - before[k] for k in after}
    m, n_out = out.metrics, len(out.outputs[0].token_ids)
    decode_s = m.last_token_ts - m.first_token_ts
    drafts, accepted = delta["vllm:spec_decode_num_drafts"], delta["vllm:spec_decode_num_accepted_tokens"]
    # Fallback if the histogram is missing: one step per draft, or per token for plain decode.
    steps = delta["steps"] or drafts or n_out - 1
    return {
        "prefill_s": m.first_token_ts - m.scheduled_ts, "decode_s": decode_s, "generated": n_out,
        "decode_tok_s": (n_out - 1) / decode_s, "steps": steps, "step_s": decode_s / steps,
        "tokens_per_step": (n_out - 1) / steps, "drafts": drafts,
        "draft_tokens": delta["vllm:spec_decode_num_draft_tokens"], "accepted": accepted,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        "output_head": list(out.outputs[0].token_ids[:48]),  # shows the cycles, if any
    }


def worker(spec: dict) -> dict:
    """Runs inside a fresh process: one engine, warm-up, one timed request."""
    edit_every = spec["edit_every"] if spec["workload"] == "edit" else 0
    if edit_every:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # apply_model on this process's model
    from vllm import LLM

    t0 = time.time()
    llm = LLM(spec["model"], load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=model_len(spec["context"], spec["decode_tokens"]),
              max_num_batched_tokens=spec["chunk"], gpu_memory_utilization=spec["gpu_util"],
              enable_prefix_caching=False, disable_log_stats=False, enforce_eager=spec["eager"],
              seed=0, **engine_kwargs(spec["config"], spec["cpu_kv_gib"]))
    if edit_every:
        llm.apply_model(build_chain_model)
    result = {"startup_s": round(time.time() - t0, 1), "gpu_mem_used_mib": sum(base_bench.gpu_memory_used_mib())}
    # Warm-up: the first steps of each shape (and the proposer) are slow.
    result["warmup"] = timed_request(llm, build_prompt(256, seed=1, edit_every=edit_every), 32)
    result.update(timed_request(llm, build_prompt(spec["context"], edit_every=edit_every),
                                spec["decode_tokens"]))
    if edit_every:
        # The model continues C (from the cue's last token), as built.
        expected = chain()[CUE:CUE + len(result["output_head"])]
        result["continues_passage"] = result["output_head"] == expected
    return result


def run_child(spec: dict, log: Path, timeout: int) -> dict:
    """One config in its own process (and process group)."""
    res, text = base_bench.run_worker(__file__, spec, log, spec["config"], timeout)
    res = {"config": spec["config"], **res}
    for line in re.findall(r"HEADINFER placement: (.*)", text)[-1:]:
        res["placement"] = line.strip()
    return res


def kv_read_gbs(name: str, res: dict, layers: int, context: int) -> float | None:
    """Offloaded KV bytes one step reads over the link / step time (R<n> only)."""
    base, _ = parse_config(name)
    if not base.startswith("R") or "step_s" not in res:
        return None
    heads = base_bench.LLAMA3_8B["num_key_value_heads"] - int(base[1:])
    mean_len = context + res["generated"] / 2  # the KV grows during decode
    return mean_len * layers * heads * base_bench.KV_BYTES_PER_TOKEN_LAYER_HEAD / res["step_s"] / 1e9


def pairs(runs: dict) -> list[dict]:
    """Each +ngram config against its plain config."""
    rows = []
    for name, spec in runs.items():
        base, k = parse_config(name)
        plain = runs.get(base)
        if not k or not plain or "step_s" not in spec or "step_s" not in plain:
            continue
        rows.append({"plain": base, "spec": name,
                     "speedup": spec["decode_tok_s"] / plain["decode_tok_s"],
                     "verify_step_cost_ratio": spec["step_s"] / plain["step_s"],
                     "mean_acceptance_length": spec["mean_acceptance_length"]})
    return rows


def print_table(report: dict) -> None:
    print(f"\nlayers={report['layers']} context={report['context']} decode_tokens={report['decode_tokens']} "
          f"pinned H2D {report['h2d_gbs']:.1f} GB/s")
    print(f"{'config':<20}{'prefill s':>10}{'tok/s':>9}{'steps':>7}{'step ms':>9}{'tok/step':>9}"
          f"{'drafts':>8}{'accepted':>9}{'accept len':>11}{'link GB/s':>10}")
    for name, r in report["runs"].items():
        if "step_s" not in r:
            print(f"{name:<20} failed (ok={r['ok']}, see log)")
            continue
        acc = f"{r['mean_acceptance_length']:.2f}" if r["mean_acceptance_length"] else "-"
        gbs = f"{r['kv_read_gbs']:.1f}" if r.get("kv_read_gbs") else "-"
        print(f"{name:<20}{r['prefill_s']:>10.1f}{r['decode_tok_s']:>9.1f}{r['steps']:>7}"
              f"{r['step_s'] * 1e3:>9.2f}{r['tokens_per_step']:>9.2f}{r['drafts']:>8}"
              f"{r['accepted']:>9}{acc:>11}{gbs:>10}")
    for p in report["pairs"]:
        print(f"{p['spec']} vs {p['plain']}: speedup {p['speedup']:.2f}x, "
              f"verify step cost ratio {p['verify_step_cost_ratio']:.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="spec_results.json")
    ap.add_argument("--model-dir", default="/tmp/headinfer-bench-models")
    ap.add_argument("--configs", default="R0,R0+ngram4,FLASH_ATTN,FLASH_ATTN+ngram4",
                    help="FLASH_ATTN, auto or R<n>, optionally +ngram<k>")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=int, default=400, help="seconds per config")
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--gpu-util", type=float, default=0.9)
    ap.add_argument("--cpu-kv-gib", type=float, default=None)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--workload", choices=("edit", "cycle"), default="edit")
    ap.add_argument("--edit-every", type=int, default=32,
                    help="edit workload: every n-th token of the prompt's passage differs from the output")
    args = ap.parse_args(argv)
    for name in args.configs.split(","):
        parse_config(name)  # fail before any engine starts
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    out_path = Path(args.out)
    log = out_path.with_suffix(".log")
    log.write_text("")
    model = base_bench.write_model(Path(args.model_dir), args.layers)
    report = {"h2d_gbs": base_bench.measure_h2d_gbs(), "layers": args.layers, "context": args.context,
              "decode_tokens": args.decode_tokens, "chunk": args.chunk, "workload": args.workload,
              "edit_every": args.edit_every, "runs": {}, "pairs": []}
    print(f"pinned H2D: {report['h2d_gbs']:.1f} GB/s", flush=True)
    for name in args.configs.split(","):
        spec = {"config": name, "model": str(model), "context": args.context,
                "decode_tokens": args.decode_tokens, "chunk": args.chunk, "gpu_util": args.gpu_util,
                "cpu_kv_gib": args.cpu_kv_gib, "eager": args.eager, "workload": args.workload,
                "edit_every": args.edit_every}
        res = run_child(spec, log, args.timeout)
        res["kv_read_gbs"] = kv_read_gbs(name, res, args.layers, args.context)
        report["runs"][name] = res
        report["pairs"] = pairs(report["runs"])
        out_path.write_text(json.dumps(report, indent=1))
        print(name, json.dumps({k: v for k, v in res.items() if k != "warmup"})[:400], flush=True)
    print_table(report)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    main()
