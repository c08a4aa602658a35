"""What per-layer head splits rely on in vLLM 0.32, checked against vLLM itself.

HEADINFER gives layers of one model different resident head counts, so
device pages of different sizes, under one block-id space. No patch does
that: vLLM groups full-attention layers whose specs differ only in page size
into one KV cache group (``UniformTypeKVCacheSpecs``), sizes a block as the
sum of the layers' pages, and lays each layer out on its own under its
default (layer-outer, block-compact) layout. If a vLLM upgrade changes any of
that, these tests fail before an engine would.
"""

from __future__ import annotations

import pytest
from conftest import BASE_LLM

from vllm_headinfer import placement as policy


@pytest.fixture(scope="module")
def setup(tiny_models):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    load_general_plugins()
    args = {k: v for k, v in BASE_LLM.items() if k != "disable_log_stats"}
    cfg = EngineArgs(model=tiny_models("llama-mha"), max_model_len=1024, **args).create_engine_config()
    # What the engine core resolves for HEADINFER, which declares no layouts.
    cfg.cache_config.kv_cache_layout = "LBNHC"
    import torch

    full = FullAttentionSpec(block_size=32, num_kv_heads=4, head_size=32, dtype=torch.float32)
    return cfg, full


def _specs(full, counts):
    from vllm_headinfer.spec import split_spec

    return {f"model.layers.{i}.self_attn.attn": split_spec(full, c) for i, c in enumerate(counts)}


@pytest.mark.parametrize("counts", [(4, 2, 0, 1), (3, 3, 3, 2), (4, 4, 4, 4), (0, 0, 0, 0)])
def test_one_group_with_the_policy_bytes_per_block(setup, counts):
    import vllm.v1.core.kv_cache_utils as kcu
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    cfg, full = setup
    specs = _specs(full, counts)
    groups = kcu.get_kv_cache_groups(cfg, dict(specs))
    assert len(groups) == 1 and sorted(groups[0].layer_names) == sorted(specs)
    if len(set(counts)) > 1:
        assert isinstance(groups[0].kv_cache_spec, UniformTypeKVCacheSpecs)
    kv = policy.RankKV(
        layer_indices=(0, 1, 2, 3),
        num_kv_heads=4,
        block_size=32,
        head_block_bytes=full.page_size_bytes // 4,
        placeholder_bytes=_specs(full, (0,))["model.layers.0.self_attn.attn"].page_size_bytes,
    )
    assert kcu._pool_bytes_per_block(cfg, groups) == kv.device_bytes_per_block(counts)


def test_each_layer_gets_its_own_page_size(setup):
    import vllm.v1.core.kv_cache_utils as kcu

    cfg, full = setup
    counts = (4, 2, 0, 1)
    specs = _specs(full, counts)
    groups = kcu.get_kv_cache_groups(cfg, dict(specs))
    config = kcu.get_kv_cache_config_from_groups(cfg, groups, 100 * sum(
        s.page_size_bytes for s in specs.values()
    ))
    assert config.num_blocks == 100
    # One tensor per distinct spec, covering every layer once.
    covered = sorted(name for t in config.kv_cache_tensors for name in t.layers)
    assert covered == sorted(specs)


def test_layer_index_from_name():
    from vllm_headinfer.capacity import layer_index

    assert layer_index("model.layers.17.self_attn.attn") == 17
    assert layer_index("language_model.model.layers.3.self_attn.attn") == 3
