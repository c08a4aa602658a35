"""Wraps ``vllm.engine.arg_utils.EngineArgs.create_engine_config``.

This is where ``vllm serve``, ``LLM(...)`` and the Ray launchers turn user
arguments into a VllmConfig, in the user's process, before any engine process
starts. HEADINFER settings are validated against the model there, so bad input
fails at once with a message naming the setting, and the resolved settings
(defaults and environment fallbacks filled in) travel with the config to every
process. vLLM has no hook for validating a plugin's part of additional_config.
"""

from vllm_headinfer.patches._wrap import wrap

TARGET = ("self", "usage_context", "headless")


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make(orig):
        def create_engine_config(self, usage_context=None, headless=False):
            vllm_config = orig(self, usage_context, headless)
            from vllm_headinfer.startup import resolve

            resolve(vllm_config)
            return vllm_config

        return create_engine_config

    wrap([EngineArgs], "create_engine_config", TARGET, make)
