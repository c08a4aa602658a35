"""HeadInfer settings: parsing, validation against the model, resolution.

Settings come from ``additional_config["headinfer"]`` (``--additional-config``)
with ``VLLM_HEADINFER_*`` environment variables as fallbacks. They are resolved
once in the process that builds the engine config; the resolved values are
written back into ``additional_config`` so that every engine-core, worker and
Ray process reads the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import TYPE_CHECKING, Any

from vllm_headinfer import BACKEND_NAME
from vllm_headinfer.coattention_split import SHARE_STEPS
from vllm_headinfer.kv_quant import accepted_kv_dtypes

if TYPE_CHECKING:
    from vllm.config import VllmConfig

CONFIG_KEY = "headinfer"
# Default host budget: this share of the RAM that is free at startup, split
# over the ranks of the node. The rest stays for weights, the OS and page cache.
DEFAULT_FREE_RAM_SHARE = 0.5
# At startup, refuse budgets above this share of free RAM, less a reserve per
# rank for the engine's own processes (CUDA context, libraries, buffers): each
# rank's pool is allocated only after its process has loaded the model. On the
# 125 GiB H100 host a 105.9 GiB pool with 124 GiB free got the engine killed
# while pinning; 90 GiB served (benchmarks/RESULTS.md).
HOST_SHARE_LIMIT = 0.8
HOST_RESERVE_PER_RANK_BYTES = 3 << 30
OFFLOAD_PATHS = ("auto", "uva", "staged")

# key -> (environment fallback, description shown in errors and the README)
SETTINGS = {
    "resident_kv_heads": (
        "VLLM_HEADINFER_RESIDENT_KV_HEADS",
        "KV heads per layer and tensor-parallel rank kept in device KV pages: "
        "'auto' (the most the device KV budget allows for kv_pool_tokens), an "
        "integer 0..H for every layer, or a list of one integer 0..H per layer "
        "of the model (H = KV heads per rank); the other heads live in host "
        "memory. Default 'auto'.",
    ),
    "kv_pool_tokens": (
        "VLLM_HEADINFER_KV_POOL_TOKENS",
        "Tokens the KV pool must hold when resident_kv_heads is 'auto': an "
        "integer > 0, or 'max' (the largest pool device and host budgets hold "
        "together). Default: max_model_len ('max' with --max-model-len auto).",
    ),
    "cpu_kv_gib": (
        "VLLM_HEADINFER_CPU_KV_GIB",
        "Host memory for the offloaded heads' KV, GiB per rank (float > 0). "
        f"Default: {DEFAULT_FREE_RAM_SHARE:.0%} of the RAM free at startup, "
        "split over the ranks of the node.",
    ),
    "decode_path": (
        "VLLM_HEADINFER_DECODE_PATH",
        "CUDA only: how decode steps (and speculative verify steps of up to 32 "
        "tokens per request) read offloaded heads: 'uva' (attention "
        "reads pinned host pages in place), 'staged' (blocks copied to device "
        "staging first) or 'auto' (measured best: uva). Default 'auto'.",
    ),
    "prefill_path": (
        "VLLM_HEADINFER_PREFILL_PATH",
        "CUDA only: same choice for steps with prefill tokens; 'auto' means "
        "'staged'. Default 'auto'.",
    ),
    "staging_mib": (
        "VLLM_HEADINFER_STAGING_MIB",
        "CUDA only: device memory for staged offloaded KV (MiB, integer >= 16, "
        "two buffers of half this size). Default 1024.",
    ),
    "cpu_attention": (
        "VLLM_HEADINFER_CPU_ATTENTION",
        "CPU co-attention: how many of each layer's offloaded KV heads CPU "
        "threads attend in decode and verify steps while the GPU reads the "
        "others: 'auto' (CUDA: measured at startup, off where it would not "
        "help; off on CPU), 'off', or a number of heads >= 0 in sixteenths "
        "(capped at the layer's offloaded heads; a fraction splits one more "
        "head: 2.5 gives the CPU two heads and the later half of each "
        "request's blocks of a third). Default 'auto'.",
    ),
    "cpu_attention_threads": (
        "VLLM_HEADINFER_CPU_ATTENTION_THREADS",
        "Threads of CPU co-attention per rank: 'auto' (the rank's share of "
        "the node's cores, less one) or an integer >= 1. Default 'auto'.",
    ),
}


class HeadInferConfigError(ValueError):
    """A HeadInfer setting, or the model, cannot be served as configured."""


def _is_number_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return value.strip().lower() not in ("inf", "-inf", "nan", "infinity", "-infinity")


def _setting_error(key: str, value: Any, accepted: str, source: str | None = None
                   ) -> HeadInferConfigError:
    """A refused value of one setting, naming where it came from (by default
    additional_config; ``relabel`` names another source). ``.setting`` keeps
    (key, value, accepted) for relabelling; the message alone crosses
    processes."""
    source = source or f"additional_config.{CONFIG_KEY}.{key}"
    hint = ""
    # JSON's "2" where 2 was meant, the usual mistake, said plainly (a
    # variable's text is parsed, so there it cannot be the mistake).
    if source.startswith("additional_config") and (
        _is_number_text(value)
        or (isinstance(value, list) and any(_is_number_text(v) for v in value))
    ):
        hint = " (write numbers without quotes: a number, not a string)"
    error = HeadInferConfigError(
        f"{source} = {value!r} is not accepted: expected {accepted}{hint}.")
    error.setting = (key, value, accepted)
    return error


def relabel(error: HeadInferConfigError, source: str, value: Any = None) -> HeadInferConfigError:
    """The same refusal naming ``source`` (and ``value``, where the source's
    own text differs from the value parsed from it)."""
    key, parsed, accepted = error.setting
    return _setting_error(key, parsed if value is None else value, accepted, source)


def env_source(key: str) -> str:
    return f"environment variable {SETTINGS[key][0]} (setting {key})"


def source_of(key: str, raw: dict | None) -> str:
    """Where a setting's value came from: additional_config, its
    environment variable, or neither (its default)."""
    if raw and key in raw:
        return f"additional_config.{CONFIG_KEY}.{key}"
    if os.environ.get(SETTINGS[key][0], "") != "":
        return env_source(key)
    return f"additional_config.{CONFIG_KEY}.{key} (not set: its default)"


AUTO = "auto"
MAX_POOL = "max"
OFF = "off"


@dataclasses.dataclass(frozen=True)
class HeadInferConfig:
    # "auto", one count for every layer, or one count per model layer.
    resident_kv_heads: str | int | tuple[int, ...] = AUTO
    # Tokens the pool must hold under "auto": None = max_model_len, or "max".
    kv_pool_tokens: int | str | None = None
    cpu_kv_gib: float | None = None
    decode_path: str = "auto"
    prefill_path: str = "auto"
    staging_mib: int = 1024
    # "auto", "off" or the offloaded heads per layer CPU threads attend, in
    # sixteenths of a head (auto: measured at startup on CUDA, off on CPU).
    cpu_attention: str | float = AUTO
    cpu_attention_threads: str | int = AUTO

    @classmethod
    def parse(cls, raw: dict | None) -> HeadInferConfig:
        """Checks types and ranges that need no model; env fills gaps.

        Values from ``additional_config`` must have their JSON type (a count
        is a number, not a string); only environment variables, which are
        strings by nature, are parsed from text.
        """
        raw = dict(raw or {})
        unknown = sorted(set(raw) - set(SETTINGS))
        if unknown:
            raise HeadInferConfigError(
                f"additional_config.{CONFIG_KEY}: unknown setting(s) "
                f"{', '.join(map(repr, unknown))}; accepted settings: "
                f"{', '.join(SETTINGS)}."
            )
        from_env = [k for k, (env, _) in SETTINGS.items() if k not in raw and os.environ.get(env, "") != ""]
        try:
            for key in from_env:
                raw[key] = _from_env_text(key, os.environ[SETTINGS[key][0]])
            return cls(**_parse_values(raw))
        except HeadInferConfigError as e:
            key = getattr(e, "setting", (None,))[0]
            if key in from_env:
                # Name the variable and its text, not the value parsed from it.
                raise relabel(e, env_source(key), os.environ[SETTINGS[key][0]]) from None
            raise

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig) -> HeadInferConfig:
        return cls.parse((vllm_config.additional_config or {}).get(CONFIG_KEY))

    @property
    def cpu_kv_bytes(self) -> int:
        assert self.cpu_kv_gib is not None, "cpu_kv_gib is resolved at startup"
        return int(self.cpu_kv_gib * (1 << 30))

    @property
    def is_auto(self) -> bool:
        return self.resident_kv_heads == AUTO

    def resident_of(self, layer_index: int, num_kv_heads: int) -> int:
        """The explicit resident count of one layer (not for "auto")."""
        assert not self.is_auto
        if isinstance(self.resident_kv_heads, tuple):
            return self.resident_kv_heads[layer_index]
        return self.resident_kv_heads

    @property
    def resolved_decode_path(self) -> str:
        return "uva" if self.decode_path == "auto" else self.decode_path

    @property
    def resolved_prefill_path(self) -> str:
        return "staged" if self.prefill_path == "auto" else self.prefill_path

    @property
    def stages(self) -> bool:
        """Whether offloaded heads need device staging buffers (CUDA)."""
        return "staged" in (self.resolved_decode_path, self.resolved_prefill_path)

    @property
    def fixed_cpu_share(self) -> float | None:
        """Offloaded heads per layer CPU threads attend as set ('off' is 0);
        None for 'auto', which the worker decides."""
        if self.cpu_attention == AUTO:
            return None
        return 0 if self.cpu_attention == OFF else self.cpu_attention

    @property
    def staging_bytes(self) -> int:
        """Device staging buffers a rank with offloaded heads takes (CUDA)."""
        return self.staging_mib << 20 if self.stages else 0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(self.resident_kv_heads, tuple):
            out["resident_kv_heads"] = list(self.resident_kv_heads)
        return out


def _parse_values(raw: dict) -> dict[str, Any]:
    """The dataclass's keyword arguments from JSON-typed values."""
    kwargs: dict[str, Any] = {}
    if "resident_kv_heads" in raw:
        kwargs["resident_kv_heads"] = _resident_setting(raw["resident_kv_heads"])
    if raw.get("kv_pool_tokens") is not None:
        kwargs["kv_pool_tokens"] = _keyword_or_int(
            "kv_pool_tokens", raw["kv_pool_tokens"], (MAX_POOL,), 1, _POOL_ACCEPTED)
    if raw.get("cpu_kv_gib") is not None:
        gib = _as_float("cpu_kv_gib", raw["cpu_kv_gib"], "a number of GiB > 0")
        if not (gib > 0 and math.isfinite(gib)):
            raise _setting_error("cpu_kv_gib", raw["cpu_kv_gib"], "a number of GiB > 0")
        kwargs["cpu_kv_gib"] = gib
    for key in ("decode_path", "prefill_path"):
        if key in raw:
            if raw[key] not in OFFLOAD_PATHS:
                raise _setting_error(key, raw[key], f"one of {OFFLOAD_PATHS}")
            kwargs[key] = raw[key]
    if "staging_mib" in raw:
        kwargs["staging_mib"] = _keyword_or_int(
            "staging_mib", raw["staging_mib"], (), 16, "an integer >= 16")
    if "cpu_attention" in raw:
        kwargs["cpu_attention"] = _cpu_attention_setting(raw["cpu_attention"])
    if "cpu_attention_threads" in raw:
        kwargs["cpu_attention_threads"] = _keyword_or_int(
            "cpu_attention_threads", raw["cpu_attention_threads"], (AUTO,), 1, _THREADS_ACCEPTED)
    return kwargs


_RESIDENT_ACCEPTED = "'auto', an integer 0..H or a list of integers 0..H, one per layer"
_POOL_ACCEPTED = "an integer number of tokens > 0 or 'max'"
_CPU_ATTENTION_ACCEPTED = (
    f"'auto', 'off' or a number of KV heads >= 0 in sixteenths (a multiple of 1/{SHARE_STEPS})")
_THREADS_ACCEPTED = "'auto' or an integer >= 1"


def _from_env_text(key: str, text: str) -> Any:
    """An environment variable's text as the JSON value it stands for:
    numbers and lists (``1,2,2`` or ``[1, 2, 2]``) parsed, words kept."""
    text = text.strip()
    if key == "resident_kv_heads" and ("," in text or text.startswith("[")):
        try:
            return [int(x) for x in text.strip("[]").split(",")]
        except ValueError:
            raise _setting_error(key, text, _RESIDENT_ACCEPTED) from None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _resident_setting(value: Any) -> str | int | tuple[int, ...]:
    if value == AUTO:
        return AUTO
    if isinstance(value, (list, tuple)):
        if not value:
            raise _setting_error("resident_kv_heads", value, _RESIDENT_ACCEPTED)
        counts = tuple(_as_int("resident_kv_heads", v, _RESIDENT_ACCEPTED) for v in value)
        if min(counts) < 0:
            raise _setting_error("resident_kv_heads", value, _RESIDENT_ACCEPTED)
        return counts
    count = _as_int("resident_kv_heads", value, _RESIDENT_ACCEPTED)
    if count < 0:
        raise _setting_error("resident_kv_heads", value, _RESIDENT_ACCEPTED)
    return count


def _keyword_or_int(key: str, value: Any, keywords: tuple[str, ...], minimum: int,
                    accepted: str) -> str | int:
    """One of ``keywords``, or an integer >= ``minimum``."""
    if value in keywords:
        return value
    number = _as_int(key, value, accepted)
    if number < minimum:
        raise _setting_error(key, value, accepted)
    return number


def _cpu_attention_setting(value: Any) -> str | float:
    """'auto', 'off', or heads in sixteenths (an integer stays an int)."""
    if value in (AUTO, OFF):
        return value
    heads = _as_float("cpu_attention", value, _CPU_ATTENTION_ACCEPTED)
    steps = heads * SHARE_STEPS
    if not (heads >= 0 and math.isfinite(heads) and steps.is_integer()):
        raise _setting_error("cpu_attention", value, _CPU_ATTENTION_ACCEPTED)
    return int(heads) if heads.is_integer() else heads


def _as_int(key: str, value: Any, accepted: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _setting_error(key, value, accepted)
    if not float(value).is_integer():
        raise _setting_error(key, value, accepted)
    return int(value)


def _as_float(key: str, value: Any, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _setting_error(key, value, accepted)
    return float(value)


def is_selected(vllm_config: VllmConfig) -> bool:
    """True when any attention layer kind is served by HEADINFER."""
    attn = vllm_config.attention_config
    chosen = [attn.backend, *attn.backend_per_kind.values()]
    return any(b is not None and b.name == BACKEND_NAME for b in chosen)


def ranks_per_node(vllm_config: VllmConfig) -> int:
    parallel = vllm_config.parallel_config
    return max(1, parallel.world_size // max(1, parallel.nnodes))


def _cgroup_free_bytes() -> int | None:
    """Memory left under this container's cgroup limit, which free RAM as the
    kernel reports it does not show (cgroup v2, then v1)."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            return int(limit) - usage
        return None
    return None


def available_host_bytes() -> int:
    """RAM this process can still get: the kernel's available memory, capped
    by the container's cgroup limit."""
    import psutil

    free = int(psutil.virtual_memory().available)
    cgroup = _cgroup_free_bytes()
    return free if cgroup is None else min(free, cgroup)


def host_limit_per_rank(free: int, ranks: int) -> int:
    """The largest cpu_kv_gib (in bytes) accepted at startup."""
    return max(0, int(free * HOST_SHARE_LIMIT - HOST_RESERVE_PER_RANK_BYTES * ranks) // ranks)


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
        raise _setting_error(
            "cpu_attention",
            cfg.cpu_attention,
            "'auto' or 'off' with decode_path 'staged' (co-attention shares out "
            "the offloaded heads decode steps read in place: decode_path 'uva')",
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

    _check_resident_counts(vllm_config, cfg)

    ranks = ranks_per_node(vllm_config)
    free = available_host_bytes()
    limit = host_limit_per_rank(free, ranks)
    if cfg.cpu_kv_gib is None:
        default = round(min(free * DEFAULT_FREE_RAM_SHARE / ranks, limit) / (1 << 30), 3)
        if default <= 0:
            raise _setting_error(
                "cpu_kv_gib",
                None,
                f"a budget, but only {free / (1 << 30):.2f} GiB of RAM is free, "
                "too little to offload KV after the engine's own needs",
            )
        cfg = dataclasses.replace(cfg, cpu_kv_gib=default)
    if cfg.cpu_kv_bytes > limit and not _planning_elsewhere:
        raise _setting_error(
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
        from vllm_headinfer.capacity import check_before_engine

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
        raise _setting_error(
            "resident_kv_heads",
            list(value) if isinstance(value, tuple) else value,
            f"'auto' or integers 0..{heads} (this model has {heads} KV heads per "
            "tensor-parallel rank)",
        )
    if isinstance(value, tuple) and len(value) != layers:
        raise _setting_error(
            "resident_kv_heads",
            list(value),
            f"a list of {layers} integers 0..{heads}, one per layer of this "
            f"model (got {len(value)})",
        )
