"""Wraps ``vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls``.

Why: vLLM's CPU platform logs "Cannot use X backend on CPU" and returns
CPU_ATTN for any selected backend; no public hook lets a plugin backend be
chosen there. This makes an explicit HEADINFER selection win; everything else
is unchanged.
Goes away when: the CPU platform honours a registered out-of-tree backend, as
the CUDA platform does (validate_configuration on the selected class).
"""

from vllm_headinfer import BACKEND_NAME, BACKEND_PATH
from vllm_headinfer.patches._wrap import Target, wrap


def target() -> Target:
    from vllm.platforms.cpu import CpuPlatform

    return Target(
        (CpuPlatform,), "get_attn_backend_cls",
        ("cls", "selected_backend", "attn_selector_config", "num_heads"),
    )


def apply() -> None:
    def make(orig):
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            if selected_backend is not None and selected_backend.name == BACKEND_NAME:
                from vllm_headinfer.backend import HeadInferBackend

                reasons = HeadInferBackend.validate_configuration(
                    device_capability=None, **attn_selector_config._asdict()
                )
                if reasons:
                    raise ValueError(
                        "HEADINFER cannot serve this layer: " + "; ".join(reasons)
                    )
                return BACKEND_PATH
            return orig(cls, selected_backend, attn_selector_config, num_heads)

        return get_attn_backend_cls

    wrap(target(), make)
