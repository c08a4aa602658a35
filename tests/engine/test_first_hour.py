"""What a new user reads first, checked without an engine: where a refused
value came from, "a number, not a string", a refusal printed alone at the
top of the user's process, the startup line naming which heads sit where,
and the planner on a shipped real checkpoint's shape planning a GPU with
CUDA's defaults from this CPU machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from vllm_headinfer import model_shapes
from vllm_headinfer import placement as policy
from vllm_headinfer.capacity import describe_heads, link_wording
from vllm_headinfer.config import SETTINGS, HeadInferConfig, HeadInferConfigError


def refusal(raw: dict, monkeypatch, env: dict | None = None) -> str:
    for key, (var, _) in SETTINGS.items():
        monkeypatch.delenv(var, raising=False)
    for var, text in (env or {}).items():
        monkeypatch.setenv(var, text)
    with pytest.raises(HeadInferConfigError) as err:
        HeadInferConfig.parse(raw)
    return str(err.value)


def test_a_refused_setting_names_additional_config_not_the_variable(monkeypatch):
    msg = refusal({"cpu_kv_gib": -1}, monkeypatch)
    assert msg.startswith("additional_config.headinfer.cpu_kv_gib = -1 is not accepted")
    assert "VLLM_HEADINFER" not in msg


def test_a_refused_variable_names_the_variable_and_its_text(monkeypatch):
    msg = refusal({}, monkeypatch, {"VLLM_HEADINFER_CPU_KV_GIB": "lots"})
    assert msg.startswith(
        "environment variable VLLM_HEADINFER_CPU_KV_GIB (setting cpu_kv_gib) = 'lots' is not accepted")
    msg = refusal({}, monkeypatch, {"VLLM_HEADINFER_RESIDENT_KV_HEADS": "1,x"})
    assert msg.startswith("environment variable VLLM_HEADINFER_RESIDENT_KV_HEADS (setting resident_kv_heads) = '1,x'")
    # A number's text is parsed from a variable, so "not a string" is no hint there.
    msg = refusal({}, monkeypatch, {"VLLM_HEADINFER_KV_POOL_TOKENS": "-3"})
    assert "-3" in msg and "not a string" not in msg


@pytest.mark.parametrize("raw", [
    {"resident_kv_heads": "2"}, {"resident_kv_heads": ["2", 1]}, {"cpu_kv_gib": "8"},
    {"kv_pool_tokens": "4096"}, {"staging_mib": "64"}, {"cpu_attention": "2.5"},
])
def test_a_quoted_number_is_called_a_number_not_a_string(raw, monkeypatch):
    assert "a number, not a string" in refusal(raw, monkeypatch)


@pytest.mark.parametrize("raw", [{"resident_kv_heads": "two"}, {"cpu_kv_gib": "inf"}, {"resident_kv_heads": 9.5}])
def test_other_mistakes_get_no_number_hint(raw, monkeypatch):
    assert "not a string" not in refusal(raw, monkeypatch)


def test_a_refusal_travels_between_processes_with_its_message(monkeypatch):
    import pickle

    message = refusal({}, monkeypatch, {"VLLM_HEADINFER_CPU_KV_GIB": "x"})
    back = pickle.loads(pickle.dumps(HeadInferConfigError(message)))
    assert type(back) is HeadInferConfigError and str(back) == message


def test_an_uncaught_refusal_is_the_last_line_without_a_traceback():
    script = (
        "from vllm_headinfer.config import HeadInferConfigError\nfrom vllm_headinfer.startup import show_refusals_alone\n"
        "show_refusals_alone()\n"
        "def build(): raise HeadInferConfigError('additional_config.headinfer.x = 1 is not accepted')\n"
        "build()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.rstrip().splitlines()[-1] == (
        "HEADINFER refused to start: additional_config.headinfer.x = 1 is not accepted")
    assert "Traceback" not in out.stderr
    # Any other error keeps its traceback.
    other = script.replace("raise HeadInferConfigError(", "raise KeyError(")
    out = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, timeout=120)
    assert "Traceback" in out.stderr and "HEADINFER refused" not in out.stderr


KV = policy.RankKV(tuple(range(4)), 8, 16, 4096, 64)


def placed(counts) -> policy.Placement:
    return policy.Placement(KV, tuple(counts), 100, "device")


def test_the_heads_line_names_each_run_of_layers():
    line = describe_heads(placed([7, 7, 6, 8]), on_gpu=True)
    assert line == (
        "layers 0-1: heads 0-6 on the GPU, head 7 in host RAM; "
        "layer 2: heads 0-5 on the GPU, heads 6-7 in host RAM; layer 3: heads 0-7 on the GPU")
    assert describe_heads(placed([0] * 4), on_gpu=True) == "layers 0-3: heads 0-7 in host RAM"


def test_cpu_wording_names_no_link():
    p = placed([1, 1, 1, 1])
    line = describe_heads(p, on_gpu=False)
    assert line == "layers 0-3: head 0 in vLLM's KV cache, heads 1-7 in the host pool"
    summary = p.summary(link_wording(False))
    assert "link" not in summary and "MiB from the host pool per 1K tokens" in summary
    assert "MiB over the link per 1K tokens" in p.summary(link_wording(True))


def test_shipped_shapes_are_real_long_context_configs():
    for name, checkpoint in model_shapes.CHECKPOINTS.items():
        config = json.loads((model_shapes.path(name) / "config.json").read_text())
        assert config["max_position_embeddings"] >= 262144, name
        assert config["torch_dtype"] == "bfloat16" and "/" in checkpoint
    with pytest.raises(ValueError, match="llama-3-8b-1048k"):
        model_shapes.path("llama-3-8b")


def plan(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ALLOW_LONG_MAX_MODEL_LEN"}
    return subprocess.run([sys.executable, "-m", "vllm_headinfer.plan", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env)


def test_planner_plans_a_gpu_from_this_machine_with_cuda_defaults():
    """The README's planner example: a real 1M-token checkpoint's shape, no
    environment variable, CUDA's 16-token blocks and vLLM's own memory
    share, and a link rate it says it assumed."""
    out = plan("--model-shape", "llama-3-8b-1048k", "--gpu-memory-gib", "79.2",
               "--max-model-len", "524288", "--additional-config", '{"headinfer": {"cpu_kv_gib": 90}}')
    assert out.returncode == 0, out.stderr[-3000:]
    from vllm.config import CacheConfig

    text = out.stdout
    assert "model gradientai/Llama-3-8B-Instruct-Gradient-1048k" in text
    assert f"79.2 GiB x {CacheConfig().gpu_memory_utilization}" in text
    link = next(ln for ln in text.splitlines() if ln.startswith("link: "))
    assert link.startswith("link: 50.0 GB/s (assumed")
    line = next(ln for ln in text.splitlines() if ln.startswith("startup line: "))
    blocks, tokens = map(int, re.search(r"pool (\d+) blocks = (\d+) tokens", line).groups())
    assert tokens == (blocks - 1) * CacheConfig.DEFAULT_BLOCK_SIZE
    assert "over the link" in line and "heads 0-" in text


def test_planner_help_shows_its_own_flags_without_importing_vllm():
    """Plain --help answers at once: vLLM's engine flags are named and
    pointed to (--help=GROUP), not imported and listed."""
    out = plan("--help")
    assert out.returncode == 0
    for flag in ("--model-shape", "--gpu-memory-gib", "--link-gbps", "--measure", "--contexts",
                 "--help=GROUP", "--max-model-len"):
        assert flag in out.stdout, flag
    probe = ("import sys\nfrom vllm_headinfer import plan\ntry:\n    plan.main(['--help'])\n"
             "except SystemExit:\n    print('imported vllm:', 'vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "imported vllm: False"


def test_planner_help_for_a_group_or_flag_is_left_to_vllms_parser():
    from vllm_headinfer.plan import wants_plain_help

    assert wants_plain_help(["--help"]) and wants_plain_help(["--model-shape", "x", "-h"])
    assert not wants_plain_help(["--help=CacheConfig"]) and not wants_plain_help(["--help=max-model-len"])


def test_checks_after_parsing_name_the_source_too(monkeypatch):
    """Checks against the model or the machine run after parsing; they name
    the value's source the same way (config.resolve relabels with source_of)."""
    from vllm_headinfer.config import source_of

    monkeypatch.delenv("VLLM_HEADINFER_CPU_KV_GIB", raising=False)
    assert source_of("cpu_kv_gib", {"cpu_kv_gib": 9}) == "additional_config.headinfer.cpu_kv_gib"
    assert source_of("cpu_kv_gib", {}).endswith("(not set: its default)")
    monkeypatch.setenv("VLLM_HEADINFER_CPU_KV_GIB", "9")
    assert source_of("cpu_kv_gib", {}) == "environment variable VLLM_HEADINFER_CPU_KV_GIB (setting cpu_kv_gib)"
    assert source_of("cpu_kv_gib", {"cpu_kv_gib": 9}) == "additional_config.headinfer.cpu_kv_gib"
