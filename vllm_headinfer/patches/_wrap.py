"""Idempotent, signature-checked wrapping of a vLLM function."""

from __future__ import annotations

import functools
import inspect

MARK = "__headinfer_wraps__"


class VllmDriftError(RuntimeError):
    """The vLLM function a patch wraps is missing or changed shape."""


def original(owner, attr: str):
    fn = inspect.getattr_static(owner, attr, None)
    if fn is None:
        raise VllmDriftError(
            f"HEADINFER patch target {getattr(owner, '__name__', owner)}.{attr} is "
            "missing; this vLLM is not the supported 0.32.0."
        )
    raw = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
    return getattr(raw, MARK, raw), fn


def check_signature(fn, expected: tuple[str, ...], where: str) -> None:
    params = tuple(inspect.signature(fn).parameters)
    if params != expected:
        raise VllmDriftError(
            f"HEADINFER patch target {where} has parameters {params}, expected "
            f"{expected}; this vLLM is not the supported 0.32.0."
        )


def wrap(owners: list, attr: str, expected: tuple[str, ...], make):
    """Replaces ``attr`` on every owner by ``make(original)``; re-applying
    wraps the original again, never the wrapper."""
    first, _ = original(owners[0], attr)
    check_signature(first, expected, f"{owners[0].__name__}.{attr}")
    wrapper = make(first)
    functools.update_wrapper(wrapper, first)
    setattr(wrapper, MARK, first)
    for owner in owners:
        orig, static = original(owner, attr)
        if orig is not first:
            raise VllmDriftError(
                f"HEADINFER patch target {owner.__name__}.{attr} is not the same "
                f"function as {owners[0].__name__}.{attr}."
            )
        if isinstance(static, classmethod):
            setattr(owner, attr, classmethod(wrapper))
        else:
            setattr(owner, attr, wrapper)
    return wrapper


def is_wrapped(owner, attr: str) -> bool:
    fn = inspect.getattr_static(owner, attr)
    raw = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
    return hasattr(raw, MARK)
