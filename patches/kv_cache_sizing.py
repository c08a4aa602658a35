"""Wraps ``vllm.v1.core.kv_cache_utils.get_kv_cache_configs`` (and the copy of
that name imported into ``vllm.v1.engine.core``).

The engine core turns each worker's free device memory into a KV block count
here; nothing in that flow knows about host memory. For HEADINFER layers every
block also needs host memory for its offloaded heads, so each worker's budget
is clamped to what ``cpu_kv_gib`` holds before vLLM's own auto-fit, max-length
check, block planning and capacity log run on it.
"""

from vllm_headinfer.patches._wrap import wrap

TARGET = ("vllm_config", "kv_cache_specs", "available_memory")


def apply() -> None:
    import vllm.v1.core.kv_cache_utils as kv_cache_utils
    import vllm.v1.engine.core as engine_core

    def make(orig):
        def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
            from vllm_headinfer.capacity import headinfer_specs, host_budget, log_placement

            if not any(headinfer_specs(specs) for specs in kv_cache_specs):
                return orig(vllm_config, kv_cache_specs, available_memory)
            budgets = [host_budget(vllm_config, specs) for specs in kv_cache_specs]
            clamped = []
            for budget, avail in zip(budgets, available_memory):
                if budget is not None:
                    budget.check_max_model_len(vllm_config)
                    avail = min(avail, budget.device_equivalent())
                clamped.append(avail)
            configs = orig(vllm_config, kv_cache_specs, clamped)
            for specs, budget, cfg in zip(kv_cache_specs, budgets, configs):
                if headinfer_specs(specs):
                    log_placement(vllm_config, specs, cfg.num_blocks, budget)
                    break
            return configs

        return get_kv_cache_configs

    wrap([kv_cache_utils, engine_core], "get_kv_cache_configs", TARGET, make)
