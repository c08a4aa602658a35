"""Wraps ``vllm.v1.core.kv_cache_utils.get_kv_cache_configs`` (and the copy of
that name imported into ``vllm.v1.engine.core``).

The engine core turns each worker's free device memory into a KV block count
here, once for all ranks; nothing in that flow knows about host memory or
head placement. For HEADINFER layers this is where heads are placed
(capacity.place_workers): each layer's spec is re-split as placed, and each
worker's budget is clamped to what ``cpu_kv_gib`` holds, before vLLM's own
auto-fit, max-length check, block planning and capacity log run on them.
The specs reach every worker inside the KV cache configs returned here.
"""

from vllm_headinfer.patches._wrap import wrap

TARGET = ("vllm_config", "kv_cache_specs", "available_memory")


def apply() -> None:
    import vllm.v1.core.kv_cache_utils as kv_cache_utils
    import vllm.v1.engine.core as engine_core

    def make(orig):
        def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
            from vllm_headinfer.capacity import headinfer_specs, log_placement, place_workers
            from vllm_headinfer.metrics import publish

            if not any(headinfer_specs(specs) for specs in kv_cache_specs):
                return orig(vllm_config, kv_cache_specs, available_memory)
            specs, clamped, placements = place_workers(
                vllm_config, kv_cache_specs, available_memory
            )
            configs = orig(vllm_config, specs, clamped)
            # One line per distinct placement: tensor-parallel ranks share
            # one, pipeline stages each have their own layers.
            logged: dict[int, object] = {}
            for rank, placement in sorted(placements.items()):
                if id(placement) not in logged:
                    logged[id(placement)] = log_placement(vllm_config, placement, configs[rank])
            publish(vllm_config, logged[id(placements[min(placements)])])
            return configs

        return get_kv_cache_configs

    wrap([kv_cache_utils, engine_core], "get_kv_cache_configs", TARGET, make)
