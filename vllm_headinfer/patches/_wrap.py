"""Idempotent, signature-checked wrapping of a vLLM function."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from vllm_headinfer.vllm_support import UnsupportedVllm, params

MARK = "__headinfer_wraps__"


class VllmDriftError(UnsupportedVllm):
    """The vLLM function a patch wraps is missing or changed shape."""


@dataclass(frozen=True)
class Target:
    """A vLLM function a patch wraps: the same function on every owner
    (modules that imported it by name hold their own reference)."""

    owners: tuple
    attr: str
    expected: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{getattr(self.owners[0], '__name__', self.owners[0])}.{self.attr}"

    def original(self):
        """The unwrapped function, checked on every owner; raises
        VllmDriftError naming what differs."""
        first, _ = _original(self.owners[0], self.attr)
        found = params(first)
        if found != self.expected:
            raise VllmDriftError(f"{self.where} takes {found}, expected {self.expected}")
        for owner in self.owners[1:]:
            if _original(owner, self.attr)[0] is not first:
                raise VllmDriftError(
                    f"{owner.__name__}.{self.attr} is not the same function as {self.where}"
                )
        return first


def _original(owner, attr: str):
    fn = inspect.getattr_static(owner, attr, None)
    if fn is None:
        raise VllmDriftError(f"{getattr(owner, '__name__', owner)}.{attr} is missing")
    raw = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
    return getattr(raw, MARK, raw), fn


def wrap(target: Target, make):
    """Replaces the target on every owner by ``make(original)``; re-applying
    wraps the original again, never the wrapper."""
    first = target.original()
    wrapper = make(first)
    functools.update_wrapper(wrapper, first)
    setattr(wrapper, MARK, first)
    for owner in target.owners:
        _, static = _original(owner, target.attr)
        setattr(owner, target.attr, classmethod(wrapper) if isinstance(static, classmethod) else wrapper)
    return wrapper


def is_wrapped(owner, attr: str) -> bool:
    fn = inspect.getattr_static(owner, attr)
    raw = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
    return hasattr(raw, MARK)
