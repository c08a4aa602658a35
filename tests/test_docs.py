"""The README's settings table lists every setting config.py accepts."""

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
