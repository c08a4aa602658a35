"""How vLLM loads the plugin: the HEADINFER enum member in every process, and
the patches where this vLLM is a supported one.

The selected backend travels inside the pickled VllmConfig as an enum member.
Unpickling calls ``AttentionBackendEnum(value)``, so a process that has not
registered HEADINFER yet (a spawned engine core or worker, a Ray actor) would
fail before any vLLM code runs. Two hooks close that gap:

* ``platform_entry`` (vllm.platform_plugins) runs while ``vllm.config`` is first
  imported, which unpickling the config does before it rebuilds the member.
* ``general_entry`` (vllm.general_plugins) also installs a copyreg reducer in
  the pickling process, so the HEADINFER member is rebuilt by name through
  ``restore_member``, which registers on demand. This covers processes where
  platform plugins are skipped (``VLLM_TARGET_DEVICE=cpu``). Every other member
  pickles exactly as vLLM pickles it.

On a vLLM this plugin does not support (patches.unsupported_reason), the
general hook logs one warning and applies no patch, so vLLM runs as if the
plugin were absent; asking for HEADINFER is refused with the same line
(``refuse_unsupported``).

Keep this module import-light: it runs while ``vllm.config`` is half imported.
"""

from __future__ import annotations

import copyreg

from vllm_headinfer import BACKEND_NAME, BACKEND_PATH, vllm_support


def ensure_registered():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        # An explicit class path: an empty one would alias TORCH_SDPA's value.
        AttentionBackendEnum.register(BACKEND_NAME, BACKEND_PATH)
    return AttentionBackendEnum[BACKEND_NAME]


def restore_member(name: str):
    """Unpickling target for the HEADINFER member (see module doc)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if name == BACKEND_NAME:
        return ensure_registered()
    return AttentionBackendEnum[name]


def _reduce_member(member):
    if member.name == BACKEND_NAME:
        return restore_member, (member.name,)
    return type(member), (member.value,)  # Enum's own reduction


def platform_entry() -> None:
    """Registers the enum member; returns None so no platform is claimed.

    The member is registered on any vLLM that has the registry, so that
    asking for HEADINFER reaches the plugin's refusal instead of a KeyError."""
    try:
        ensure_registered()
    except Exception:  # a vLLM without this registry: general_entry says why
        return None
    return None


def general_entry() -> None:
    from vllm_headinfer.patches import apply_all, unsupported_reason

    reason = unsupported_reason()
    if reason is not None:
        from vllm.logger import init_logger

        init_logger("vllm.headinfer").warning(reason)
        vllm_support.refuse(reason)
        refuse_unsupported(reason)
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    ensure_registered()
    copyreg.pickle(AttentionBackendEnum, _reduce_member)
    apply_all()


def refuse_unsupported(reason: str) -> None:
    """On an unsupported vLLM, where ``EngineArgs.create_engine_config`` still
    has its known shape, a guard there refuses HEADINFER in the user's process
    with ``reason``; configs that do not ask for HEADINFER pass through it
    unchanged. Where it has not, the backend's validate_configuration gives
    the same reason when vLLM picks the backend."""
    from vllm_headinfer.patches import engine_config_validation
    from vllm_headinfer.patches._wrap import VllmDriftError, wrap

    try:
        target = engine_config_validation.target()
        target.original()
    except (VllmDriftError, ImportError):
        return

    def make(orig):
        def create_engine_config(self, usage_context=None, headless=False):
            vllm_config = orig(self, usage_context, headless)
            from vllm_headinfer.config import HeadInferConfigError, is_selected
            from vllm_headinfer.startup import show_refusals_alone

            if is_selected(vllm_config):
                show_refusals_alone()
                raise HeadInferConfigError(reason)
            return vllm_config

        return create_engine_config

    wrap(target, make)
