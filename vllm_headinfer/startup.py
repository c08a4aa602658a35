"""Startup checks: in the process that builds the engine config, the
settings are checked against the model, the platform and the host, resolved
(the host budget filled in) and pinned into ``additional_config``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING

from vllm_headinfer import BACKEND_NAME
from vllm_headinfer.capacity import check_before_engine
from vllm_headinfer.config import (
    CONFIG_KEY,
    SETTINGS,
    HeadInferConfig,
    HeadInferConfigError,
    is_selected,
    relabel,
    setting_error,
    source_of,
)
from vllm_headinfer.host_memory import (
    DEFAULT_FREE_RAM_SHARE,
    available_host_bytes,
    host_limit_per_rank,
    ranks_per_node,
)
from vllm_headinfer.kv_quant import accepted_kv_dtypes

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def _check_model(vllm_config: VllmConfig) -> None:
    """Refuses models and features whose KV HEADINFER cannot split exactly."""
    model = vllm_config.model_config
    attn = vllm_config.attention_config
    global_backend = attn.backend is not None and attn.backend.name == BACKEND_NAME
    if model.use_mla:
        raise HeadInferConfigError(
            "--attention-backend HEADINFER: MLA models (one latent KV per token, "
            "no KV heads to split) are not supported; use the default backend."
        )
    if model.is_hybrid or model.is_attention_free:
        raise HeadInferConfigError(
            "--attention-backend HEADINFER: hybrid and attention-free models "
            "(state-space or linear-attention layers) are not supported; "
            "supported are decoder models with full attention layers."
        )
    layer_types = getattr(model.hf_text_config, "layer_types", None) or []
    has_window = model.get_sliding_window() is not None or any(
        "sliding" in str(t) for t in layer_types
    )
    if has_window and global_backend:
        raise HeadInferConfigError(
            "--attention-backend HEADINFER: this model has sliding-window layers, "
            "which HEADINFER does not serve. Select it for full-attention layers "
            "only: --attention-config "
            '\'{"backend_per_kind": {"full_attention": "HEADINFER"}}\'.'
        )
    if vllm_config.kv_transfer_config is not None:
        raise HeadInferConfigError(
            "--attention-backend HEADINFER cannot be combined with a KV connector "
            "(--kv-transfer-config / --kv-offloading-size): a connector would "
            "move only the resident heads. Remove the connector setting."
        )
    cache_dtype = vllm_config.cache_config.cache_dtype
    from vllm.platforms import current_platform

    accepted = accepted_kv_dtypes(current_platform.is_cuda())
    if cache_dtype not in accepted:
        raise HeadInferConfigError(
            f"--kv-cache-dtype {cache_dtype} is not supported with HEADINFER on "
            f"this platform; accepted values: {', '.join(accepted)}."
        )
    _check_speculative(vllm_config.speculative_config)
    parallel = vllm_config.parallel_config
    if parallel.decode_context_parallel_size > 1 or getattr(
        parallel, "prefill_context_parallel_size", 1
    ) > 1:
        raise HeadInferConfigError(
            "--decode-context-parallel-size / --prefill-context-parallel-size > 1 "
            "is not supported with HEADINFER; use tensor parallelism."
        )


# Proposers HEADINFER serves: prompt lookup adds no attention layers; the
# layers of a draft model, an EAGLE head or the target's own MTP layers
# register after the target's and keep every head on the device
# (capacity.placed_specs). Others (Medusa, MLP speculators, ...) are not
# verified with head placement.
SPECULATION_METHODS = ("ngram", "suffix", "draft_model", "eagle", "eagle3", "mtp")


def _check_speculative(spec) -> None:
    if spec is None or spec.method in SPECULATION_METHODS:
        return
    raise HeadInferConfigError(
        f"--speculative-config method {spec.method!r} is not supported with "
        "HEADINFER yet (its draft layers are not verified with head "
        f"placement). Accepted methods: {', '.join(SPECULATION_METHODS)}."
    )


def check_cpu_attention(cfg: HeadInferConfig, is_cuda: bool) -> None:
    """CPU co-attention shares out the offloaded heads that decode steps read
    in place: on CUDA a fixed count needs those steps on the 'uva' path."""
    if is_cuda and cfg.fixed_cpu_share and cfg.resolved_decode_path != "uva":
        raise setting_error(
            "cpu_attention",
            cfg.cpu_attention,
            "'auto' or 'off' with decode_path 'staged' (co-attention shares out "
            "the offloaded heads decode steps read in place: decode_path 'uva')",
        )


def check_microbatching(cfg: HeadInferConfig, parallel_config, is_cuda: bool) -> None:
    """CPU co-attention (on CUDA, unless 'off') serves the process's layer
    calls in one order through one query and output slot, posted from one
    thread onto one stream; dual-batch overlap or micro-batching runs the
    micro-batches' layers from two threads on two streams."""
    if not is_cuda or cfg.fixed_cpu_share == 0:
        return
    if parallel_config.enable_dbo:
        setting = "--enable-dbo"
    elif parallel_config.ubatch_size > 1:
        setting = f"--ubatch-size {parallel_config.ubatch_size}"
    else:
        return
    raise setting_error(
        "cpu_attention",
        cfg.cpu_attention,
        f"'off' with {setting} (micro-batches run their layers at once from two threads "
        "on two streams; CPU co-attention serves one), or drop that setting",
    )


def resolve(vllm_config: VllmConfig) -> HeadInferConfig | None:
    """Validates everything at startup and pins the resolved settings.

    Returns None when HEADINFER is not selected. Raises HeadInferConfigError
    naming the setting, where its value came from and the accepted values
    otherwise; left uncaught, it is printed as one line (show_refusals_alone).
    """
    raw = (vllm_config.additional_config or {}).get(CONFIG_KEY)
    try:
        return _resolve(vllm_config, raw)
    except HeadInferConfigError as e:
        show_refusals_alone()
        key = getattr(e, "setting", (None,))[0]
        source = key and source_of(key, raw if isinstance(raw, dict) else None)
        if key and not str(e).startswith(source):
            # A check after parsing, of a value the environment (or the
            # default) gave: say so.
            raise relabel(e, source) from None
        raise


def show_refusals_alone() -> None:
    """A refusal that reaches the top of the user's process (``vllm serve``,
    a script calling ``LLM(...)``) is printed as its message on a line of its
    own, as the last thing printed, not under a traceback through vLLM's
    engine-config code; anything else keeps Python's usual report.
    ``VLLM_HEADINFER_TRACEBACK=1`` keeps the traceback for bug reports."""
    import sys

    previous = sys.excepthook
    if getattr(previous, "headinfer", False) or os.environ.get("VLLM_HEADINFER_TRACEBACK") == "1":
        return

    def hook(kind, error, tb):
        if issubclass(kind, HeadInferConfigError):
            sys.stderr.flush()
            print(f"\nHEADINFER refused to start: {error}", file=sys.stderr, flush=True)
        else:
            previous(kind, error, tb)

    hook.headinfer = True
    sys.excepthook = hook


def _resolve(vllm_config: VllmConfig, raw) -> HeadInferConfig | None:
    if not is_selected(vllm_config):
        if raw:
            raise HeadInferConfigError(
                f"additional_config.{CONFIG_KEY} is set but the attention backend "
                "is not HEADINFER: add --attention-backend HEADINFER."
            )
        return None
    if raw is not None and not isinstance(raw, dict):
        raise HeadInferConfigError(
            f"additional_config.{CONFIG_KEY} must be a JSON object of settings "
            f"({', '.join(SETTINGS)}), got {raw!r}."
        )
    cfg = HeadInferConfig.parse(raw)
    _check_model(vllm_config)
    from vllm.platforms import current_platform

    check_cpu_attention(cfg, current_platform.is_cuda())
    check_microbatching(cfg, vllm_config.parallel_config, current_platform.is_cuda())

    _check_resident_counts(vllm_config, cfg)

    ranks = ranks_per_node(vllm_config)
    free = available_host_bytes()
    limit = host_limit_per_rank(free, ranks)
    if cfg.cpu_kv_gib is None:
        default = round(min(free * DEFAULT_FREE_RAM_SHARE / ranks, limit) / (1 << 30), 3)
        if default <= 0:
            raise setting_error(
                "cpu_kv_gib",
                None,
                f"a budget, but only {free / (1 << 30):.2f} GiB of RAM is free, "
                "too little to offload KV after the engine's own needs",
            )
        cfg = dataclasses.replace(cfg, cpu_kv_gib=default)
    if cfg.cpu_kv_bytes > limit and not _planning_elsewhere:
        raise setting_error(
            "cpu_kv_gib",
            cfg.cpu_kv_gib,
            f"at most {limit / (1 << 30):.2f} GiB per rank: {ranks} rank(s) on "
            f"this node would take {cfg.cpu_kv_gib * ranks:.2f} GiB of the "
            f"{free / (1 << 30):.2f} GiB of RAM free now, which must also hold "
            "the engine processes",
        )
    vllm_config.additional_config[CONFIG_KEY] = cfg.as_dict()
    if vllm_config.attention_config.backend is not None and (
        vllm_config.attention_config.backend.name == BACKEND_NAME
    ):
        # Every layer is HEADINFER's: what the budgets known here cannot hold
        # is refused in the user's process; the engine core decides the
        # placement with the profiled device budget and checks again.
        check_before_engine(vllm_config, cfg)
    return cfg


# The planner (plan.py) plans for the machine its flags describe, which need
# not be the one it runs on: this machine's free RAM does not bound cpu_kv_gib.
_planning_elsewhere = False


@contextlib.contextmanager
def planning_elsewhere():
    global _planning_elsewhere
    _planning_elsewhere = True
    try:
        yield
    finally:
        _planning_elsewhere = False


def _check_resident_counts(vllm_config: VllmConfig, cfg: HeadInferConfig) -> None:
    heads = vllm_config.model_config.get_num_kv_heads(vllm_config.parallel_config)
    layers = vllm_config.model_config.get_total_num_hidden_layers()
    value = cfg.resident_kv_heads
    if cfg.is_auto:
        return
    counts = value if isinstance(value, tuple) else (value,)
    if max(counts) > heads:
        raise setting_error(
            "resident_kv_heads",
            list(value) if isinstance(value, tuple) else value,
            f"'auto' or integers 0..{heads} (this model has {heads} KV heads per "
            "tensor-parallel rank)",
        )
    if isinstance(value, tuple) and len(value) != layers:
        raise setting_error(
            "resident_kv_heads",
            list(value),
            f"a list of {layers} integers 0..{heads}, one per layer of this "
            f"model (got {len(value)})",
        )
