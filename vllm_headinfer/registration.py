"""Makes HEADINFER a member of vLLM's AttentionBackendEnum in every process.

The selected backend travels inside the pickled VllmConfig as an enum member.
Unpickling calls ``AttentionBackendEnum(value)``, so a process that has not
registered HEADINFER yet (a spawned engine core or worker, a Ray actor) would
fail before any vLLM code runs. Two hooks close that gap:

* ``platform_entry`` (vllm.platform_plugins) runs while ``vllm.config`` is first
  imported, which unpickling the config does before it rebuilds the member.
* ``general_entry`` (vllm.general_plugins) also installs a copyreg reducer in
  the pickling process, so the member is rebuilt by name through
  ``restore_member``, which registers on demand. This covers processes where
  platform plugins are skipped (``VLLM_TARGET_DEVICE=cpu``).

Keep this module import-light: it runs while ``vllm.config`` is half imported.
"""

from __future__ import annotations

import copyreg

from vllm_headinfer import BACKEND_NAME, BACKEND_PATH


def ensure_registered():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        # An explicit class path: an empty one would alias TORCH_SDPA's value.
        AttentionBackendEnum.register(BACKEND_NAME, BACKEND_PATH)
    return AttentionBackendEnum[BACKEND_NAME]


def restore_member(name: str):
    """Unpickling target for AttentionBackendEnum members (see module doc)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if name == BACKEND_NAME:
        return ensure_registered()
    return AttentionBackendEnum[name]


def _reduce_member(member):
    return restore_member, (member.name,)


def platform_entry() -> None:
    """Registers the enum member; returns None so no platform is claimed."""
    ensure_registered()
    return None


def general_entry() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    ensure_registered()
    copyreg.pickle(AttentionBackendEnum, _reduce_member)

    from vllm_headinfer.patches import apply_all

    apply_all()
