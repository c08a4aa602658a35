"""Every change HEADINFER makes to vLLM internals, one module each.

Each patch names the vLLM function it wraps, checks that function's signature
before wrapping (a vLLM upgrade that changes it fails loudly at startup, not
silently), and is idempotent: plugins are loaded more than once per process.
Nothing here changes behaviour unless HEADINFER is selected.
"""

from vllm_headinfer.patches import (
    cpu_attention_selection,
    engine_config_validation,
    kv_cache_sizing,
)

ALL = (cpu_attention_selection, engine_config_validation, kv_cache_sizing)


def apply_all() -> None:
    for patch in ALL:
        patch.apply()
