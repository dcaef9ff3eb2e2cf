"""Federated-optimisation strategies, one module each, found by name.

Adding a strategy is adding one file to this folder that defines a :class:`Strategy`
subclass with its own non-empty ``name``: :func:`available` imports every module of the
package and collects them, :func:`make` builds one from keyword parameters, and
:func:`cli_parameters` gives ``server.py`` the union of all their parameters to turn into
flags (``server_lr`` -> ``--server-lr``).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
import typing
from typing import Any, Mapping

from fl.strategies.base import Aggregator, MeanAggregator, Strategy, StrategyError, flag

__all__ = ["Aggregator", "MeanAggregator", "Strategy", "StrategyError", "available", "cli_parameters", "make"]


@functools.cache
def _registry() -> dict[str, type[Strategy]]:
    found: dict[str, type[Strategy]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            # Only classes defined in that module that set their own name: a module that
            # imports FedAvg, or a helper subclass inheriting a name, registers nothing.
            if not (inspect.isclass(obj) and issubclass(obj, Strategy) and obj.__module__ == module.__name__):
                continue
            name = obj.__dict__.get("name", "")
            if not name:
                continue
            if name in found and found[name] is not obj:
                raise RuntimeError(f"strategy name {name!r} is defined twice: {found[name].__qualname__} "
                                   f"and {obj.__module__}.{obj.__qualname__}")
            found[name] = obj
    return dict(sorted(found.items()))


def available() -> dict[str, type[Strategy]]:
    """Every strategy of the package by name, sorted by name."""
    return dict(_registry())


def make(name: str, **params: Any) -> Strategy:
    """The strategy ``name`` with ``params`` (the rest at their defaults), validated.

    Raises :class:`StrategyError` (one line) for an unknown name, a parameter the strategy
    does not have, or a value outside its published range."""
    strategies = _registry()
    cls = strategies.get(name)
    if cls is None:
        raise StrategyError(f"unknown strategy {name!r} (known: {', '.join(strategies)})")
    fields = cls.parameters()
    unknown = sorted(set(params) - set(fields))
    if unknown:
        own = ", ".join(flag(f) for f in fields) or "none"
        raise StrategyError(f"{flag(unknown[0])} is not a parameter of {name} (its parameters: {own})")
    return cls(**params)


def cli_parameters(strategies: Mapping[str, type[Strategy]] | None = None) -> dict[str, dataclasses.Field]:
    """The union of all strategies' parameters, by field name (sorted), for ``--help``.

    Each is a fresh ``dataclasses.Field`` with a resolved ``type`` (``float``...) and
    ``metadata``: ``help`` (the first strategy's help, followed by each strategy's default,
    e.g. "server learning rate eta (default: fedadagrad, fedadam 0.1; fedavgm 1; fedyogi 0.01)"),
    ``defaults`` ({strategy: default}) and ``strategies`` (the names that take it). Its
    ``default`` is the common default when every strategy that takes it agrees, else
    ``dataclasses.MISSING``: defaults differ per strategy (Flower's eta is 0.1 for FedAdam,
    0.01 for FedYogi), so a flag should default to None and only the flags a user gave
    should reach :func:`make`.

    A field name shared by two strategies must mean one type (TypeError otherwise), and
    every field must carry ``metadata={"help": ...}`` (ValueError otherwise)."""
    strategies = _registry() if strategies is None else strategies
    types: dict[str, type] = {}
    helps: dict[str, str] = {}
    defaults: dict[str, dict[str, Any]] = {}
    for sname, cls in sorted(strategies.items()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if f.name in types and types[f.name] != tp:
                raise TypeError(f"parameter {f.name!r} is {types[f.name]} in {next(iter(defaults[f.name]))} "
                                f"but {tp} in {sname}")
            if not f.metadata.get("help"):
                raise ValueError(f"parameter {f.name!r} of {sname} has no metadata['help']")
            types.setdefault(f.name, tp)
            helps.setdefault(f.name, f.metadata["help"])
            defaults.setdefault(f.name, {})[sname] = f.default
    out: dict[str, dataclasses.Field] = {}
    for fname in sorted(types):
        per = defaults[fname]
        by_value: dict[str, list[str]] = {}
        for sname, d in per.items():
            by_value.setdefault(f"{d:g}" if isinstance(d, float) else repr(d), []).append(sname)
        shown = "; ".join(f"{', '.join(names)} {v}" for v, names in by_value.items())
        values = list(per.values())
        common = values[0] if all(v == values[0] for v in values) else dataclasses.MISSING
        field = dataclasses.field(default=common, metadata={
            "help": f"{helps[fname]} (default: {shown})", "defaults": dict(per), "strategies": tuple(per)})
        field.name, field.type = fname, types[fname]
        out[fname] = field
    return out
