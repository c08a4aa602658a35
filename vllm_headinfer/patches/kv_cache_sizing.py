"""Wraps ``get_kv_cache_configs`` where vLLM keeps it (``kv_cache_utils`` in
0.32, ``kv_cache_planning`` since 0.33) and the copy of that name imported
into ``vllm.v1.engine.core``.

Why: the engine core turns each worker's free device memory into a KV block
count here, once for all ranks; nothing in that flow knows about host memory
or head placement. For HEADINFER layers this is where heads are placed
(capacity.place_workers): each layer's spec is re-split as placed, and each
worker's budget is clamped to what ``cpu_kv_gib`` holds, before vLLM's own
auto-fit, max-length check, block planning and capacity log run on them. The
specs reach every worker inside the KV cache configs returned here. Since 0.33
the engine core groups the layers before sizing and passes the groups in:
they are regrouped from the re-split specs, or vLLM would plan an
all-resident cache.
Goes away when: vLLM lets a backend size its own KV pages against a second
(host) budget, e.g. through its KVCacheConfigBuilder interface.
"""

from vllm_headinfer.patches._wrap import Target, wrap
from vllm_headinfer.vllm_support import kv_planning


def target() -> Target:
    import vllm.v1.engine.core as engine_core

    planning = kv_planning()
    return Target((planning.module, engine_core), "get_kv_cache_configs", planning.configs_params)


def apply() -> None:
    planning = kv_planning()

    def make(orig):
        def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory, *groups):
            from vllm_headinfer.capacity import headinfer_specs, log_placement, place_workers
            from vllm_headinfer.metrics import publish

            if not any(headinfer_specs(specs) for specs in kv_cache_specs):
                return orig(vllm_config, kv_cache_specs, available_memory, *groups)
            specs, clamped, placements = place_workers(
                vllm_config, kv_cache_specs, available_memory
            )
            if planning.takes_groups:
                groups = (planning.global_groups(vllm_config, specs),)
            configs = orig(vllm_config, specs, clamped, *groups)
            # One line per distinct placement: tensor-parallel ranks share
            # one, pipeline stages each have their own layers.
            logged: dict[int, object] = {}
            for rank, placement in sorted(placements.items()):
                if id(placement) not in logged:
                    logged[id(placement)] = log_placement(vllm_config, placement, configs[rank])
            publish(vllm_config, logged[id(placements[min(placements)])])
            return configs

        return get_kv_cache_configs

    wrap(target(), make)
