"""Registry (temporary minimal version; replaced by the strategies branch)."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from strategies.base import Strategy, StrategyError


def available() -> dict[str, type[Strategy]]:
    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")
    found = {}
    stack = list(Strategy.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.name:
            found[cls.name] = cls
    return dict(sorted(found.items()))


def make(name: str, **params) -> Strategy:
    strategies = available()
    if name not in strategies:
        raise StrategyError(f"unknown strategy {name!r} (known: {', '.join(strategies)})")
    cls = strategies[name]
    unknown = set(params) - set(cls.parameters())
    if unknown:
        raise StrategyError(f"--{sorted(unknown)[0].replace('_', '-')} is not a parameter of {name}")
    return cls(**params)


def cli_parameters() -> dict[str, dataclasses.Field]:
    out: dict[str, dataclasses.Field] = {}
    for cls in available().values():
        for n, f in cls.parameters().items():
            out.setdefault(n, f)
    return out
