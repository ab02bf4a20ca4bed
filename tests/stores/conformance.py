"""``assert_conforms(obj, Protocol)``: ``isinstance`` on a runtime-checkable Protocol only checks
that the names exist; this also checks every method's parameters, in order, so an implementation
that drifts from its Protocol (a renamed or missing argument) fails its contract suite."""

from __future__ import annotations

import inspect


def assert_conforms(obj, protocol) -> None:
    assert isinstance(obj, protocol), f"{type(obj).__name__} lacks a member of {protocol.__name__}"
    for name, member in vars(protocol).items():
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        want = list(inspect.signature(member).parameters.values())[1:]  # without self
        got = list(inspect.signature(getattr(obj, name)).parameters.values())
        assert [p.name for p in got[: len(want)]] == [p.name for p in want], (
            f"{type(obj).__name__}.{name}{inspect.signature(getattr(obj, name))} does not match "
            f"{protocol.__name__}.{name}{inspect.signature(member)}")
        extra = [p.name for p in got[len(want):]
                 if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert not extra, f"{type(obj).__name__}.{name} requires arguments the Protocol does not pass: {extra}"
