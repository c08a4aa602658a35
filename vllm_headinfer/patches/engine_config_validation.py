"""Wraps ``vllm.engine.arg_utils.EngineArgs.create_engine_config``.

Why: this is where ``vllm serve``, ``LLM(...)`` and the Ray launchers turn user
arguments into a VllmConfig, in the user's process, before any engine process
starts. HEADINFER settings are validated against the model there, so bad input
fails at once with a message naming the setting, and the resolved settings
(defaults and environment fallbacks filled in) travel with the config to every
process. Configs that do not select HEADINFER pass through untouched.
Goes away when: vLLM validates a plugin's part of additional_config (a
validation hook for general plugins).
"""

from vllm_headinfer.patches._wrap import Target, wrap


def target() -> Target:
    from vllm.engine.arg_utils import EngineArgs

    return Target((EngineArgs,), "create_engine_config", ("self", "usage_context", "headless"))


def apply() -> None:
    def make(orig):
        def create_engine_config(self, usage_context=None, headless=False):
            vllm_config = orig(self, usage_context, headless)
            from vllm_headinfer.startup import resolve

            resolve(vllm_config)
            return vllm_config

        return create_engine_config

    wrap(target(), make)
