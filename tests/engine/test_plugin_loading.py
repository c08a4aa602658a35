"""A pickled VllmConfig selecting HEADINFER unpickles in a fresh interpreter.

vLLM ships its config to spawned engine cores and workers and to Ray actors by
pickling it; the selected backend travels as an AttentionBackendEnum member.
A fresh process that has not registered HEADINFER yet must still rebuild it.
The parent builds the config the way LLM(...) does
(``EngineArgs(...).create_engine_config()``) and pickles it with pickle and with
cloudpickle (what Ray uses); each child is a bare ``python -c`` whose code never
imports vllm_headinfer: only vLLM's plugin entry points and the pickle itself
may bring it in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

PARENT = textwrap.dedent(
    """
    import json, pickle, sys
    import cloudpickle
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    model, out = sys.argv[1], sys.argv[2]
    cfg = EngineArgs(
        model=model, dtype="float32", max_model_len=1024, block_size=32,
        enforce_eager=True, attention_backend="HEADINFER",
        additional_config={"headinfer": {"resident_kv_heads": 1, "cpu_kv_gib": 0.05}},
    ).create_engine_config()
    assert cfg.attention_config.backend.name == "HEADINFER"
    others = [AttentionBackendEnum.CPU_ATTN, AttentionBackendEnum.TORCH_SDPA]
    with open(out + "/pickle.pkl", "wb") as f:
        pickle.dump((cfg, others), f)
    with open(out + "/cloudpickle.pkl", "wb") as f:
        cloudpickle.dump((cfg, others), f)
    # The enum's own reduction (by value), as a process without vLLM's general
    # plugins would write it: the child's platform-plugin hook must register
    # HEADINFER before the member is looked up.
    with open(out + "/byvalue.pkl", "wb") as f:
        p = pickle.Pickler(f)
        p.dispatch_table = {}
        p.dump((cfg, others))
    print("PARENT " + json.dumps({"path": cfg.attention_config.backend.get_path()}))
    """
)

# Must not import vllm_headinfer (checked below).
CHILD = textwrap.dedent(
    """
    import json, pickle, sys
    assert not any(m.startswith("vllm_headinfer") for m in sys.modules)
    with open(sys.argv[1], "rb") as f:
        cfg, others = pickle.load(f)
    b = cfg.attention_config.backend
    print("CHILD " + json.dumps({
        "enum": f"{type(b).__module__}.{type(b).__qualname__}",
        "name": b.name,
        "path": b.get_path(),
        "class": b.get_class().__name__,
        "others": [m.name for m in others],
        "headinfer": cfg.additional_config.get("headinfer"),
    }))
    """
)
assert "vllm_headinfer" not in CHILD.replace('m.startswith("vllm_headinfer")', "")

VARIANTS = [
    ("pickle", {}),
    ("cloudpickle", {}),
    ("byvalue", {}),
    # Platform plugins are skipped with VLLM_TARGET_DEVICE=cpu; the pickled
    # reducer must bring HEADINFER back on its own.
    ("pickle", {"VLLM_TARGET_DEVICE": "cpu"}),
    ("cloudpickle", {"VLLM_TARGET_DEVICE": "cpu"}),
]


def _marked(output: str, mark: str) -> dict:
    lines = [ln for ln in output.splitlines() if ln.startswith(mark + " ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len(mark) + 1 :])


@pytest.fixture(scope="module")
def pickled(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("pickled")
    proc = subprocess.run(
        [sys.executable, "-c", PARENT, tiny_models("llama-gqa"), str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(REPO), stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, _marked(proc.stdout, "PARENT")


@pytest.fixture(scope="module")
def children(pickled):
    """Runs every variant's child at once (each is a cold vLLM import)."""
    out, _ = pickled
    procs = []
    for kind, env in VARIANTS:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_HEADINFER")}
        child_env.update(env)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, str(out / f"{kind}.pkl")],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env=child_env, cwd="/", stdin=subprocess.DEVNULL,
            )
        )
    results = {}
    for (kind, env), proc in zip(VARIANTS, procs):
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        results[(kind, tuple(env.items()))] = (proc.returncode, output)
    return results


@pytest.mark.parametrize(
    "kind,env", VARIANTS, ids=[k + ("-target-cpu" if e else "") for k, e in VARIANTS]
)
def test_unpickles_in_fresh_interpreter(pickled, children, kind, env):
    _, parent = pickled
    rc, output = children[(kind, tuple(env.items()))]
    assert rc == 0, output[-4000:]
    child = _marked(output, "CHILD")
    assert child["enum"] == "vllm.v1.attention.backends.registry.AttentionBackendEnum"
    assert child["name"] == "HEADINFER"
    assert child["path"] == parent["path"] == "vllm_headinfer.backend.HeadInferBackend"
    assert child["class"] == "HeadInferBackend"
    # Registering HEADINFER did not disturb other members (TORCH_SDPA's value
    # is "", which a registration without a class path would alias).
    assert child["others"] == ["CPU_ATTN", "TORCH_SDPA"]
    # The settings were resolved in the parent and travel with the config.
    assert child["headinfer"]["resident_kv_heads"] == 1
    assert child["headinfer"]["cpu_kv_gib"] == 0.05
