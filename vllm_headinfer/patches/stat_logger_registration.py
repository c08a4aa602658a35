"""Wraps ``vllm.v1.engine.async_llm.AsyncLLM.__init__``.

Why: the ``headinfer:`` series of ``/metrics`` come from a stat logger
(metrics.HeadInferStatLogger). vLLM's ``vllm.stat_logger_plugins`` entry points
are loaded into every AsyncLLM and turn ``log_stats`` on for all of them, so a
plugin installed but not selected would change every server. This hands the
logger to AsyncLLM through its own ``stat_loggers`` argument, and only where
the config selects HEADINFER.
Goes away when: vLLM lets a stat-logger plugin decline per config (e.g. a
factory that may return None) without enabling stats.
"""

from vllm_headinfer.patches._wrap import Target, wrap


def target() -> Target:
    from vllm.v1.engine.async_llm import AsyncLLM

    return Target(
        (AsyncLLM,), "__init__",
        ("self", "vllm_config", "executor_class", "log_stats", "usage_context", "mm_registry",
         "log_requests", "start_engine_loop", "stat_loggers", "aggregate_engine_logging",
         "client_addresses", "client_count", "client_index", "profiler"),
    )


def with_headinfer_logger(stat_loggers):
    from vllm_headinfer.metrics import HeadInferStatLogger

    loggers = list(stat_loggers or [])
    if HeadInferStatLogger not in loggers:
        loggers.append(HeadInferStatLogger)
    return loggers


def apply() -> None:
    import inspect

    def make(orig):
        signature = inspect.signature(orig)

        def __init__(self, vllm_config, *args, **kwargs):
            from vllm_headinfer.config import is_selected

            if not is_selected(vllm_config):
                return orig(self, vllm_config, *args, **kwargs)
            bound = signature.bind(self, vllm_config, *args, **kwargs)
            bound.arguments["stat_loggers"] = with_headinfer_logger(
                bound.arguments.get("stat_loggers")
            )
            return orig(*bound.args, **bound.kwargs)

        return __init__

    wrap(target(), make)
