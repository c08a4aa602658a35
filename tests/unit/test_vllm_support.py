"""The version layer: which vLLM is supported, where its names are found, and
what the plugin installs (and does not) on a vLLM it supports."""

from __future__ import annotations

import pickle
import sys
import types
from types import SimpleNamespace

import pytest

from vllm_headinfer import vllm_support


@pytest.mark.parametrize(
    "version, supported",
    [("0.32.0", True), ("0.32.1", True), ("0.33.0", True), ("0.34.0", True),
     ("0.34.2.dev3+g1234abc", True), ("0.31.9", False), ("0.35.0", False),
     ("0.35.0rc1", False), ("1.0.0", False), ("unknown", False)],
)
def test_version_range(version, supported):
    assert vllm_support.version_in_range(version) is supported


def test_this_vllm_is_supported_and_planning_found_where_it_keeps_it():
    from packaging.version import Version

    from vllm_headinfer.patches import unsupported_reason

    assert unsupported_reason() is None
    planning = vllm_support.kv_planning()
    moved = Version(vllm_support.installed_version()).release[:2] >= (0, 33)
    expected = "kv_cache_planning" if moved else "kv_cache_utils"
    assert planning.module.__name__ == f"vllm.v1.core.{expected}"
    assert planning.takes_groups is moved


def test_a_vllm_outside_the_range_is_refused_naming_both_versions(monkeypatch):
    from vllm_headinfer import patches

    monkeypatch.setattr(vllm_support, "installed_version", lambda: "0.35.0")
    patches.unsupported_reason.cache_clear()
    try:
        reason = patches.unsupported_reason()
    finally:
        patches.unsupported_reason.cache_clear()
    assert "this is vLLM 0.35.0" in reason and "0.32.0 through 0.34.x" in reason


def _planning_module(**overrides):
    """A stand-in for vLLM 0.33+'s kv_cache_planning module."""
    mod = types.ModuleType("vllm.v1.core.kv_cache_planning")

    def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory, global_kv_cache_groups):
        return ("configs", kv_cache_specs, available_memory, global_kv_cache_groups)

    mod.get_kv_cache_configs = get_kv_cache_configs
    mod.get_kv_cache_groups_from_builder = lambda builder, cfg, specs: ["groups of", specs]
    mod.get_global_kv_cache_groups = lambda cfg, specs: ["global groups of", specs]
    mod._pool_bytes_per_block_from_builder = lambda builder, cfg, groups: 4096
    for k, v in overrides.items():
        setattr(mod, k, v)
    return mod


def test_planning_found_where_0_33_keeps_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm.v1.core.kv_cache_planning", _planning_module())
    planning = vllm_support._locate_planning()
    assert planning.takes_groups
    assert planning.configs_params[-1] == "global_kv_cache_groups"


def test_planning_with_another_signature_is_refused(monkeypatch):
    drifted = _planning_module(get_kv_cache_configs=lambda vllm_config, kv_cache_specs: None)
    monkeypatch.setitem(sys.modules, "vllm.v1.core.kv_cache_planning", drifted)
    with pytest.raises(vllm_support.UnsupportedVllm, match="get_kv_cache_configs takes"):
        vllm_support._locate_planning()


def test_sizing_regroups_the_resplit_specs_where_vllm_passes_groups(monkeypatch):
    """On 0.33+, the groups vLLM computed from all-resident specs must be
    replaced by the groups of the specs as placed, or vLLM plans an
    all-resident cache."""
    from vllm_headinfer import capacity, metrics
    from vllm_headinfer.patches import kv_cache_sizing

    module = _planning_module()
    planning = vllm_support.KvPlanning(module, takes_groups=True)
    monkeypatch.setattr(kv_cache_sizing, "kv_planning", lambda: planning)
    engine_core = types.ModuleType("vllm.v1.engine.core")
    engine_core.get_kv_cache_configs = module.get_kv_cache_configs
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.core", engine_core)
    import vllm.v1.engine

    monkeypatch.setattr(vllm.v1.engine, "core", engine_core, raising=False)

    placed = [{"layer.0": "placed spec"}]
    monkeypatch.setattr(capacity, "headinfer_specs", lambda specs: specs)
    monkeypatch.setattr(capacity, "place_workers", lambda cfg, specs, mem: (placed, [123], {0: "p"}))
    monkeypatch.setattr(capacity, "log_placement", lambda cfg, p, config: p)
    monkeypatch.setattr(metrics, "publish", lambda cfg, p: None)
    kv_cache_sizing.apply()
    out = module.get_kv_cache_configs("cfg", [{"layer.0": "all resident"}], [999], ["stale groups"])
    assert out == ("configs", placed, [123], ["global groups of", placed])
    assert engine_core.get_kv_cache_configs is module.get_kv_cache_configs


def test_other_backends_pickle_as_without_the_plugin():
    import copyreg

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_headinfer import registration

    member = AttentionBackendEnum.CPU_ATTN
    plain = pickle.dumps(member)
    saved = copyreg.dispatch_table.get(AttentionBackendEnum)
    copyreg.pickle(AttentionBackendEnum, registration._reduce_member)
    try:
        assert pickle.dumps(member) == plain
        ours = registration.ensure_registered()
        assert pickle.loads(pickle.dumps(ours)) is ours
    finally:
        if saved is None:
            copyreg.dispatch_table.pop(AttentionBackendEnum, None)
        else:
            copyreg.dispatch_table[AttentionBackendEnum] = saved


def test_stat_logger_only_for_engines_that_select_headinfer():
    from importlib.metadata import entry_points

    from vllm_headinfer.metrics import HeadInferStatLogger
    from vllm_headinfer.patches.stat_logger_registration import with_headinfer_logger

    # No entry point: vLLM would load it into every AsyncLLM and turn stats on.
    assert not [e for e in entry_points(group="vllm.stat_logger_plugins") if "headinfer" in e.value]
    other = object()
    assert with_headinfer_logger(None) == [HeadInferStatLogger]
    assert with_headinfer_logger([other, HeadInferStatLogger]) == [other, HeadInferStatLogger]


def test_backend_selection_meets_the_refusal(monkeypatch):
    """Where vLLM picks the backend itself (CUDA), an unsupported vLLM's
    line is the reason it is given."""
    from vllm_headinfer.backend import HeadInferBackend

    monkeypatch.setattr(vllm_support, "_refusal", "the line")
    assert HeadInferBackend.validate_configuration(head_size=128) == ["the line"]
