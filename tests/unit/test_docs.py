"""The README's settings table lists every setting config.py accepts, and its
commands name files, modules, console scripts and settings that exist."""

from __future__ import annotations

import re

from conftest import REPO

from vllm_headinfer.config import SETTINGS


def test_readme_settings_table_is_complete():
    readme = (REPO / "README.md").read_text()
    rows = {
        m[1]: m[2]
        for m in re.finditer(r"^\| `(\w+)` \| `(VLLM_HEADINFER_\w+)` \|", readme, re.MULTILINE)
    }
    assert rows == {key: env for key, (env, _) in SETTINGS.items()}


def _code_blocks(lang: str) -> list[str]:
    readme = (REPO / "README.md").read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)


def test_readme_commands_refer_to_what_exists():
    """Files, modules, console scripts and settings in the README's bash and
    python blocks exist."""
    import importlib.util
    import json
    from importlib.metadata import entry_points

    scripts = {e.name for e in entry_points(group="console_scripts")}
    checked = 0
    for block in _code_blocks("bash") + _code_blocks("console"):
        text = block.replace("\\\n", " ")
        for path in re.findall(r"(?<![\w/.-])((?:scripts|examples|benchmarks|tests|\.ci)/[\w./-]+)", text):
            assert (REPO / path).exists(), f"README names {path}, which does not exist"
            checked += 1
        # A tool the block installs itself (``pip install build && python
        # -m build``) need not be here.
        installed = set(re.findall(r"pip install ([\w-]+)", text))
        for module in re.findall(r"python3? -m ([\w.]+)", text):
            if module != "pytest" and module not in installed:
                assert importlib.util.find_spec(module), f"README runs python -m {module}"
                checked += 1
        for command in re.findall(r"^\$? ?(vllm-headinfer-[\w-]+)", text, re.MULTILINE):
            assert command in scripts, f"README runs {command}, not a console script"
            checked += 1
        for config in re.findall(r"--additional-config '(\{.*?\})'", text):
            assert set(json.loads(config)["headinfer"]) <= set(SETTINGS), config
            checked += 1
    for block in _code_blocks("python"):
        for config in re.findall(r'"headinfer": (\{[^{}]*\})', block):
            assert set(json.loads(config)) <= set(SETTINGS), config
            checked += 1
    assert checked >= 10, f"only {checked} references found: the patterns no longer match"
