"""Every change HEADINFER makes to vLLM internals, one module each.

Each module says what it wraps, why no public vLLM hook does the job, and
which vLLM change would let it go. Each names its target through
``target()`` (found where the installed vLLM keeps it, see vllm_support.py),
checks that function's signature before wrapping, and is idempotent: plugins
are loaded more than once per process. Nothing here changes behaviour unless
HEADINFER is selected.

``unsupported_reason`` checks every target before any is applied: on a vLLM
where one of them moved or changed shape, none is applied.
"""

from __future__ import annotations

import functools

from vllm_headinfer.patches import (
    cpu_attention_selection,
    engine_config_validation,
    kv_cache_sizing,
    stat_logger_registration,
)
from vllm_headinfer import vllm_support
from vllm_headinfer.vllm_support import UnsupportedVllm, unsupported_message

ALL = (
    cpu_attention_selection,
    engine_config_validation,
    kv_cache_sizing,
    stat_logger_registration,
)


def check_all() -> None:
    """Raises UnsupportedVllm naming the first target that differs."""
    for patch in ALL:
        patch.target().original()


@functools.cache
def unsupported_reason() -> str | None:
    """None where this vLLM is supported and every patch target is where and
    as expected; otherwise the one line that says why not."""
    if not vllm_support.version_in_range(vllm_support.installed_version()):
        return unsupported_message("outside the supported range")
    try:
        check_all()
    except UnsupportedVllm as e:
        return unsupported_message(f"{e}: its internals differ from the supported ones")
    except ImportError as e:
        return unsupported_message(f"{e}")
    return None


def apply_all() -> None:
    for patch in ALL:
        patch.apply()
