"""A proposer HEADINFER has not verified is refused by the startup check
alone, without an engine (the engine refusals are in tests/engine/test_refusals.py)."""

from __future__ import annotations

import pytest


def test_unverified_speculation_is_refused_naming_the_setting():
    """A proposer whose layers are not verified with head placement (Medusa
    heads here) is refused at startup, naming the setting and the methods
    accepted."""
    from types import SimpleNamespace

    from vllm_headinfer.config import HeadInferConfigError
    from vllm_headinfer.startup import _check_speculative

    with pytest.raises(HeadInferConfigError, match=r"--speculative-config method 'medusa'.*eagle3, mtp"):
        _check_speculative(SimpleNamespace(method="medusa"))
    _check_speculative(SimpleNamespace(method="eagle3"))
