"""Each module in patches/: applied by plugin loading, idempotent, and loud
when the vLLM function it wraps changes shape.

These run in the pytest process: vLLM's own ``load_general_plugins()`` loads
the plugin through its entry point, as every vLLM process does.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
from conftest import REPO

PATCH_DIR = REPO / "vllm_headinfer" / "patches"


def _owners(name: str):
    import importlib

    target = importlib.import_module(f"vllm_headinfer.patches.{name}").target()
    return list(target.owners), target.attr


def _spy(name: str, calls: list):
    """A stand-in for the wrapped vLLM function with the same parameters,
    counting calls, plus the arguments to call the installed wrapper with
    (arguments under which the wrapper must just delegate)."""
    if name == "cpu_attention_selection":

        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            calls.append(1)
            return "spy"

        return classmethod(get_attn_backend_cls), lambda owner: owner.get_attn_backend_cls(None, None)
    if name == "engine_config_validation":
        fake_config = SimpleNamespace(
            attention_config=SimpleNamespace(backend=None, backend_per_kind={}),
            additional_config={},
        )

        def create_engine_config(self, usage_context=None, headless=False):
            calls.append(1)
            return fake_config

        return create_engine_config, lambda owner: owner.create_engine_config(object())
    if name == "kv_cache_sizing":
        from vllm_headinfer.vllm_support import kv_planning

        if kv_planning().takes_groups:  # vLLM 0.33 and later

            def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory,
                                     global_kv_cache_groups):
                calls.append(1)
                return "spy"

            return get_kv_cache_configs, lambda owner: owner.get_kv_cache_configs(None, [{}], [0], [])

        def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
            calls.append(1)
            return "spy"

        return get_kv_cache_configs, lambda owner: owner.get_kv_cache_configs(None, [{}], [0])
    if name == "stat_logger_registration":
        from vllm.v1.engine.async_llm import AsyncLLM

        plain = SimpleNamespace(attention_config=SimpleNamespace(backend=None, backend_per_kind={}))

        def __init__(self, vllm_config, executor_class, log_stats, usage_context=None,
                     mm_registry=None, log_requests=True, start_engine_loop=True,
                     stat_loggers=None, aggregate_engine_logging=False, client_addresses=None,
                     client_count=1, client_index=0, profiler=None):
            calls.append(stat_loggers)

        def call(owner):
            owner.__init__(object.__new__(AsyncLLM), plain, None, False)
            assert calls == [None], "a config without HEADINFER got other stat loggers"
            calls[:] = [1]

        return __init__, call
    raise AssertionError(name)


def _drifted(name: str):
    """The target with one parameter gone, as a vLLM upgrade might leave it."""
    if name == "cpu_attention_selection":
        return classmethod(lambda cls, selected_backend, attn_selector_config: None)
    if name == "engine_config_validation":
        return lambda self, usage_context=None: None
    if name == "stat_logger_registration":
        return lambda self, vllm_config, stat_loggers=None: None
    return lambda vllm_config, kv_cache_specs: None


PATCHES = sorted(p.stem for p in PATCH_DIR.glob("*.py") if not p.stem.startswith("_"))


@pytest.fixture(scope="module")
def loaded():
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    import vllm_headinfer.patches as patches
    from vllm_headinfer.patches import _wrap

    return patches, _wrap


def _module(patches, name):
    import importlib

    return importlib.import_module(f"{patches.__name__}.{name}")


def test_every_patch_module_is_applied_by_apply_all(loaded):
    patches, _ = loaded
    assert sorted(m.__name__.rsplit(".", 1)[1] for m in patches.ALL) == PATCHES


@pytest.mark.parametrize("name", PATCHES)
def test_applied_after_plugin_load(loaded, name):
    _, wrap = loaded
    owners, attr = _owners(name)
    for owner in owners:
        assert wrap.is_wrapped(owner, attr), f"{owner.__name__}.{attr} is not wrapped"
    raws = {id(_raw(o, attr)) for o in owners}
    assert len(raws) == 1, "owners hold different wrappers"


def _raw(owner, attr):
    fn = inspect.getattr_static(owner, attr)
    return fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn


@pytest.mark.parametrize("name", PATCHES)
def test_apply_is_idempotent(loaded, name, monkeypatch):
    patches, wrap = loaded
    mod = _module(patches, name)
    owners, attr = _owners(name)

    # Re-applying on top of the plugin's wrapper wraps the same original.
    original = getattr(_raw(owners[0], attr), wrap.MARK)
    assert not hasattr(original, wrap.MARK)
    mod.apply()
    mod.apply()
    for owner in owners:
        assert getattr(_raw(owner, attr), wrap.MARK) is original

    # And a call goes through the original exactly once.
    calls: list = []
    spy, call = _spy(name, calls)
    for owner in owners:
        monkeypatch.setattr(owner, attr, spy)
    mod.apply()
    mod.apply()
    mod.apply()
    for owner in owners:
        calls.clear()
        call(owner)
        assert calls == [1], f"{owner.__name__}.{attr}: original called {len(calls)} times"
        assert wrap.is_wrapped(owner, attr)


@pytest.mark.parametrize("name", PATCHES)
def test_signature_drift_is_refused(loaded, name, monkeypatch):
    patches, wrap = loaded
    mod = _module(patches, name)
    owners, attr = _owners(name)
    monkeypatch.setattr(owners[0], attr, _drifted(name))
    with pytest.raises(wrap.VllmDriftError, match=attr):
        mod.apply()


@pytest.mark.parametrize("name", PATCHES)
def test_missing_target_is_refused(loaded, name, monkeypatch):
    patches, wrap = loaded
    mod = _module(patches, name)
    owners, attr = _owners(name)
    monkeypatch.delattr(owners[0], attr)
    if inspect.getattr_static(owners[0], attr, None) is not None:
        # A base class still provides it: then its signature is what is checked.
        monkeypatch.setattr(owners[0], attr, _drifted(name))
    with pytest.raises(wrap.VllmDriftError, match=attr):
        mod.apply()
