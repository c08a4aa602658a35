"""HeadInfer settings: the table of settings and their parsing, pure.

Settings come from ``additional_config["headinfer"]`` (``--additional-config``)
with ``VLLM_HEADINFER_*`` environment variables as fallbacks. They are resolved
once in the process that builds the engine config (startup.py checks them
against the model and the host); the resolved values are written back into
``additional_config`` so that every engine-core, worker and Ray process reads
the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import TYPE_CHECKING, Any

from vllm_headinfer import BACKEND_NAME
from vllm_headinfer.coattention.split import SHARE_STEPS
from vllm_headinfer.host_memory import DEFAULT_FREE_RAM_SHARE

if TYPE_CHECKING:
    from vllm.config import VllmConfig

CONFIG_KEY = "headinfer"
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


def setting_error(key: str, value: Any, accepted: str, source: str | None = None
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
    return setting_error(key, parsed if value is None else value, accepted, source)


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
        """An engine's settings. vLLM calls each of the plugin's hooks with
        the engine's config, not with what an earlier hook made of it, so
        the settings are parsed once per process and value (the settings as
        given and the environment they fall back on) and every hook shares
        the one frozen result."""
        raw = (vllm_config.additional_config or {}).get(CONFIG_KEY)
        try:
            text = json.dumps(raw, sort_keys=True)
        except TypeError:  # (not JSON: parse() names the value)
            return cls.parse(raw)
        return _parsed(text, tuple(os.environ.get(env, "") for env, _ in SETTINGS.values()))

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
            raise setting_error("cpu_kv_gib", raw["cpu_kv_gib"], "a number of GiB > 0")
        kwargs["cpu_kv_gib"] = gib
    for key in ("decode_path", "prefill_path"):
        if key in raw:
            if raw[key] not in OFFLOAD_PATHS:
                raise setting_error(key, raw[key], f"one of {OFFLOAD_PATHS}")
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
            raise setting_error(key, text, _RESIDENT_ACCEPTED) from None
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
            raise setting_error("resident_kv_heads", value, _RESIDENT_ACCEPTED)
        counts = tuple(_as_int("resident_kv_heads", v, _RESIDENT_ACCEPTED) for v in value)
        if min(counts) < 0:
            raise setting_error("resident_kv_heads", value, _RESIDENT_ACCEPTED)
        return counts
    count = _as_int("resident_kv_heads", value, _RESIDENT_ACCEPTED)
    if count < 0:
        raise setting_error("resident_kv_heads", value, _RESIDENT_ACCEPTED)
    return count


def _keyword_or_int(key: str, value: Any, keywords: tuple[str, ...], minimum: int,
                    accepted: str) -> str | int:
    """One of ``keywords``, or an integer >= ``minimum``."""
    if value in keywords:
        return value
    number = _as_int(key, value, accepted)
    if number < minimum:
        raise setting_error(key, value, accepted)
    return number


def _cpu_attention_setting(value: Any) -> str | float:
    """'auto', 'off', or heads in sixteenths (an integer stays an int)."""
    if value in (AUTO, OFF):
        return value
    heads = _as_float("cpu_attention", value, _CPU_ATTENTION_ACCEPTED)
    steps = heads * SHARE_STEPS
    if not (heads >= 0 and math.isfinite(heads) and steps.is_integer()):
        raise setting_error("cpu_attention", value, _CPU_ATTENTION_ACCEPTED)
    return int(heads) if heads.is_integer() else heads


def _as_int(key: str, value: Any, accepted: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise setting_error(key, value, accepted)
    if not float(value).is_integer():
        raise setting_error(key, value, accepted)
    return int(value)


def _as_float(key: str, value: Any, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise setting_error(key, value, accepted)
    return float(value)


def is_selected(vllm_config: VllmConfig) -> bool:
    """True when any attention layer kind is served by HEADINFER."""
    attn = vllm_config.attention_config
    chosen = [attn.backend, *attn.backend_per_kind.values()]
    return any(b is not None and b.name == BACKEND_NAME for b in chosen)


@functools.lru_cache(maxsize=8)
def _parsed(text: str, environment: tuple[str, ...]) -> HeadInferConfig:
    """HeadInferConfig.from_vllm_config's settings, by their JSON text and
    the environment variables they may fall back on."""
    return HeadInferConfig.parse(json.loads(text))
