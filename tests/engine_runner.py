"""Runs vLLM engines described by a JSON spec and prints their results as JSON.

Usage: ``python tests/engine_runner.py SPEC.json``. The tests start this script
in a subprocess so that every engine lives outside the pytest process and a
crash or hang cannot take the test session with it.

``python tests/engine_runner.py --serve`` imports vLLM once and then, for each
line ``["SPEC.json", "LOG", ENV]`` on its stdin (once it said ``ready`` and
its environment after the imports), forks a child that runs the
spec as the command above would, in the environment ENV, its output in LOG, in
a process group of its own; it answers ``started PID`` and, once the child
ended, ``exited RC``. Importing vLLM takes most of a CPU runner's start (about
8 s of a core), so the tests keep one such fork server per worker
(conftest.py). It never imports numba: vLLM 0.32's CPU platform cannot start
an engine in a process that has (see vllm_headinfer/coattention/__init__.py),
and every child would inherit it.

Spec::

    {
      "inprocess": true,        # engine core and worker in this process
                                # (VLLM_ENABLE_V1_MULTIPROCESSING=0): ~2 s per
                                # engine instead of ~25 s. false = vLLM's default
                                # spawned engine-core and worker processes.
      "models": {"KEY": {"path": "...", "arch": "llama", ...}},   # tiny_model kwargs
      "paths": {"KEY": "/a/model/dir"},                          # models built already
      "scenarios": {"NAME": {"rounds": [[REQUEST, ...], ...]}},
      "engines": [{
          "name": "...", "model": "KEY",
          "llm": {...},          # LLM(...) keyword arguments (model is filled in)
          "env": {...},          # environment set while this engine is built
          "scenarios": ["NAME", ...],
          "prompt_logprobs": false,
          "config_only": false   # only EngineArgs(...).create_engine_config()
      }]
    }

    REQUEST = {"prompt_token_ids": [...]} or {"prompt": "..."}, plus "max_tokens".

Each round is one ``generate`` call with all its requests (greedy,
``logprobs=1``); rounds run one after the other, so a later round can hit the
prefix cache filled by an earlier one. For each engine the result holds either
``error`` (an exception raised while building it: type and message) or the
per-round outputs (token ids, the sampled tokens' logprobs, text) with the
change of vLLM's prefix-cache and preemption counters per round (and
``scenario_error`` if a ``generate`` call raised; earlier rounds are kept), the
log messages mentioning HEADINFER (``headinfer_log``, in-process only), the
host memory held by HEADINFER's pools (``host_pool_bytes``, in-process only),
the layer calls of the CPU co-attention kernel by step kind while the
scenarios ran (``coattention_calls``, in-process only) and a few resolved
config values.

The last stdout line is ``HEADINFER_RESULT <json>``.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import logging
import os
import sys
import time
import traceback

RESULT_MARK = "HEADINFER_RESULT "
METRICS = (
    "vllm:prefix_cache_hits",
    "vllm:prefix_cache_queries",
    "vllm:num_preemptions",
    "vllm:spec_decode_num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens",
)


class _Capture:
    """Keeps the message of every log record that mentions HEADINFER.

    A record factory rather than a handler: vLLM re-applies its logging
    config while an engine starts, which drops handlers of child loggers.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(self._make)

    def _make(self, *args, **kwargs) -> logging.LogRecord:
        record = self._factory(*args, **kwargs)
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format is not ours to report
            return record
        if "HEADINFER" in msg:
            self.lines.append(msg)
        return record


def _metrics(llm) -> dict[str, float]:
    out = dict.fromkeys(METRICS, 0.0)
    try:
        snapshot = llm.get_metrics()
    except AssertionError:  # stats disabled
        return out
    for m in snapshot:
        if m.name in out and getattr(m, "value", None) is not None:
            out[m.name] += float(m.value)
    return out


def _prompt(req: dict):
    if "prompt_token_ids" in req:
        return {"prompt_token_ids": req["prompt_token_ids"]}
    return req["prompt"]


def _completion(out) -> dict:
    c = out.outputs[0]
    logprobs = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]
    result = {"token_ids": list(c.token_ids), "logprobs": logprobs, "text": c.text}
    if out.prompt_logprobs is not None:
        # Position 0 has no logprob; the others hold the prompt token's logprob.
        ids = out.prompt_token_ids
        result["prompt_logprobs"] = [
            None if lp is None else lp[t].logprob for lp, t in zip(out.prompt_logprobs, ids)
        ]
    return result


def _config_summary(cfg) -> dict:
    backend = cfg.attention_config.backend
    return {
        "backend": None if backend is None else backend.name,
        "additional_config": cfg.additional_config,
        "enable_prefix_caching": cfg.cache_config.enable_prefix_caching,
        "enable_chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "block_size": cfg.cache_config.block_size,
        "num_gpu_blocks": cfg.cache_config.num_gpu_blocks,
        "max_model_len": cfg.model_config.max_model_len,
    }


def run_engine(spec: dict, engine: dict, model_path: str, capture: _Capture) -> dict:
    from vllm import LLM

    result: dict = {"error": None}
    saved_env = {k: os.environ.get(k) for k in engine.get("env", {})}
    os.environ.update({k: str(v) for k, v in engine.get("env", {}).items()})
    capture.lines.clear()
    llm = None
    try:
        t0 = time.monotonic()
        try:
            if engine.get("config_only"):
                from vllm.engine.arg_utils import EngineArgs

                cfg = EngineArgs(model=model_path, **engine.get("llm", {})).create_engine_config()
                result["config"] = _config_summary(cfg)
                return result
            llm = LLM(model=model_path, **engine.get("llm", {}))
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["error"] = {
                "type": type(e).__name__,
                "message": str(e),
                "chain": _chain(e),
            }
            return result
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        result["startup_s"] = round(time.monotonic() - t0, 2)
        calls_before = {}
        if spec.get("inprocess", False):
            # The worker runs in this process: its host pools and the CPU
            # co-attention kernel's call counts are visible.
            from vllm_headinfer.coattention.share import CALLS
            from vllm_headinfer.host_pool import host_pools

            result["host_pool_bytes"] = host_pools.total_bytes()
            calls_before = dict(CALLS)
        result["config"] = _config_summary(llm.llm_engine.vllm_config)
        result["scenarios"] = {}
        try:
            _run_scenarios(spec, engine, llm, result["scenarios"])
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["scenario_error"] = {"type": type(e).__name__, "message": str(e),
                                        "chain": _chain(e)}
        if spec.get("inprocess", False):
            result["coattention_calls"] = {
                kind: n - calls_before.get(kind, 0) for kind, n in CALLS.items()
            }
        result["headinfer_log"] = list(capture.lines)
        return result
    finally:
        if llm is not None:
            _shutdown(llm, spec.get("inprocess", False))
            if spec.get("inprocess", False):
                import psutil

                from vllm_headinfer.host_pool import host_pools

                result["after_shutdown"] = {
                    "host_pool_bytes": host_pools.total_bytes(),
                    "rss_bytes": psutil.Process().memory_info().rss,
                }


def _run_scenarios(spec: dict, engine: dict, llm, results: dict) -> None:
    """Each scenario's rounds into ``results``; an exception propagates (the
    caller reports it, with the rounds that finished)."""
    from vllm import SamplingParams

    for name in engine.get("scenarios", []):
        rounds = []
        for reqs in spec["scenarios"][name]["rounds"]:
            params = [
                SamplingParams(
                    temperature=0.0,
                    max_tokens=r["max_tokens"],
                    logprobs=1,
                    prompt_logprobs=1 if engine.get("prompt_logprobs") else None,
                    ignore_eos=True,
                )
                for r in reqs
            ]
            before = _metrics(llm)
            t1 = time.monotonic()
            outs = llm.generate([_prompt(r) for r in reqs], params, use_tqdm=False)
            seconds = round(time.monotonic() - t1, 2)
            after = _metrics(llm)
            rounds.append(
                {
                    "outputs": [_completion(o) for o in outs],
                    "metrics": {k: after[k] - before[k] for k in METRICS},
                    "seconds": seconds,
                }
            )
        results[name] = rounds


def _chain(e: BaseException) -> list[str]:
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return out


def _shutdown(llm, inprocess: bool) -> None:
    core = getattr(llm.llm_engine, "engine_core", None)
    try:
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    except Exception:  # noqa: BLE001 - best effort
        traceback.print_exc()
    del llm, core
    gc.collect()
    if inprocess:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        spec = json.load(f)
    if spec.get("inprocess", False):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    from vllm_headinfer.tiny_model import build_tiny_model

    paths = dict(spec.get("paths", {}))
    for key, m in spec.get("models", {}).items():
        paths[key] = str(build_tiny_model(m.pop("path"), **m))
    capture = _Capture()
    results = {"engines": {}}
    for engine in spec["engines"]:
        t0 = time.monotonic()
        res = run_engine(spec, engine, paths[engine["model"]], capture)
        res["total_s"] = round(time.monotonic() - t0, 2)
        results["engines"][engine["name"]] = res
        print(f"engine_runner: {engine['name']} done in {res['total_s']} s", flush=True)
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(results), flush=True)
    return 0


def serve() -> None:
    # What every child would import first.
    for module in ("vllm", "vllm.entrypoints.llm", "vllm.sampling_params", "vllm.engine.arg_utils"):
        importlib.import_module(module)

    assert "numba" not in sys.modules, "importing vLLM loaded numba"
    print("ready " + json.dumps(dict(os.environ)), flush=True)
    for line in sys.stdin:
        spec_path, log_path, env = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(spec_path, log_path, env)
        print(f"started {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exited {os.waitstatus_to_exitcode(status)}", flush=True)


def _run_child(spec_path: str, log_path: str, env: dict) -> None:
    """The forked child: the spec run as ``main`` would in a new process,
    then the exit a new process would make (atexit handlers run)."""
    rc = 1
    try:
        os.setsid()
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.environ.clear()
        os.environ.update(env)
        rc = main([__file__, spec_path])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 - reported as a new process would
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit(main(sys.argv))
