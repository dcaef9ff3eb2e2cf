"""The strategy seam: what a federated-optimisation strategy decides, and nothing else.

Each round the server hands a strategy the *deltas* of the sampled clients (local weights
minus the weights they trained from), flattened into one float32 vector in the model's
``layout.Layout`` order. The strategy

- adds keys to the training config the clients receive (:meth:`Strategy.fit_config`,
  e.g. FedProx's ``mu``);
- folds the deltas into an :class:`Aggregator` (a streaming weighted mean by default, so
  memory stays at one model however many clients report; robust rules hold the round);
- turns the aggregate into the next global weights (:meth:`Strategy.server_update`, the
  server optimiser: plain ``w + delta`` for FedAvg, momentum or Adam for the others).

Which clients train, the sample-count weighting, norm clipping, validation and
BatchNorm's buffers (its counters, and its running statistics, which are averaged rather
than stepped by a server optimizer) are the server's business, not the strategy's.

A strategy is a dataclass: its fields are its parameters, and ``server.py`` turns every
field of every strategy into a command-line flag (``server_lr`` -> ``--server-lr``), so
adding a strategy is adding one file to this folder.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar, Mapping, Protocol

import torch

from fl.common.vectors import fold


class StrategyError(ValueError):
    """A bad strategy name or parameter; ``str(e)`` is one line for the command line."""


def flag(field_name: str) -> str:
    """The command-line spelling of a parameter: ``server_lr`` -> ``--server-lr``."""
    return "--" + field_name.replace("_", "-")


def param(default: Any, help: str) -> Any:
    """A strategy parameter: a dataclass field with its ``--help`` line."""
    return dataclasses.field(default=default, metadata={"help": help})


class Aggregator(Protocol):
    """One round's fold of client deltas."""

    count: int

    def add(self, delta: torch.Tensor, weight: float) -> None:
        """Fold one (validated, float32, flat) delta; ``weight`` > 0."""

    def add_sum(self, total: torch.Tensor, count: int) -> None:
        """Fold the float64 sum of ``count`` deltas of weight 1 each, as if each had been
        added (secure aggregation: the server never sees them apart). TypeError from a rule
        that needs each delta."""

    def result(self) -> torch.Tensor:
        """The aggregate delta, float64, same length as the deltas."""


def check_delta(delta: torch.Tensor, numel: int, weight: float) -> None:
    """What every aggregator asks of its input: a flat vector of the model's size and a
    finite positive weight (a short vector would otherwise fold into a prefix silently)."""
    if delta.dim() != 1 or delta.numel() != numel:
        raise ValueError(f"delta has shape {list(delta.shape)}, expected [{numel}]")
    if not (isinstance(weight, (int, float)) and 0 < weight < math.inf):
        raise ValueError(f"weight must be positive and finite, got {weight!r}")


def check_sum(total: torch.Tensor, numel: int, count: int) -> None:
    """What every ``add_sum`` asks: a float64 vector of the model's size, and a count >= 1."""
    if total.dtype != torch.float64 or total.shape != (numel,):
        raise ValueError(f"a secure sum is float64[{numel}], got {total.dtype}{list(total.shape)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"a sum counts at least one update, got {count!r}")


class MeanAggregator:
    """Streaming weighted mean in float64: arrival order does not change the result,
    and no list of deltas is ever held."""

    def __init__(self, numel: int) -> None:
        self.sum = torch.zeros(numel, dtype=torch.float64)
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: torch.Tensor, weight: float) -> None:
        check_delta(delta, self.sum.numel(), weight)
        fold(self.sum, delta, weight)
        self.total_weight += weight
        self.count += 1

    def add_sum(self, total: torch.Tensor, count: int) -> None:
        check_sum(total, self.sum.numel(), count)
        self.sum.add_(total)
        self.total_weight += float(count)
        self.count += count

    def result(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        return self.sum / self.total_weight


def checked_state(state: object, strategy: str, keys: set[str]) -> int:
    """Check a saved optimizer state's envelope (``{"strategy", "step", *keys}``) and
    return its step count; :meth:`Strategy.load_state_dict`'s common part."""
    if not isinstance(state, Mapping):
        raise StrategyError(f"{strategy} state is a {type(state).__name__}, not a dict")
    if state.get("strategy") != strategy:
        raise StrategyError(f"the saved optimizer state belongs to {state.get('strategy')!r}, not {strategy!r}")
    expected = keys | {"strategy", "step"}
    if set(state) != expected:
        raise StrategyError(f"{strategy} state has keys {sorted(map(str, state))}, expected {sorted(expected)}")
    step = state["step"]
    if type(step) is not int or step < 0:
        raise StrategyError(f"{strategy} state has step {step!r}, expected an int >= 0")
    return step


def checked_vector(value: object, what: str, numel: int | None = None) -> torch.Tensor:
    """A saved state vector as a fresh float64 tensor: 1-D, floating, finite, of ``numel``
    values when given."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 1:
        got = f"{value.dtype}{list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise StrategyError(f"saved {what} is {got}, expected a 1-D floating tensor")
    if numel is not None and value.numel() != numel:
        raise StrategyError(f"saved {what} has {value.numel()} values, expected {numel}")
    value = value.detach().to("cpu", torch.float64, copy=True)
    if not bool(value.isfinite().all()):
        raise StrategyError(f"saved {what} holds NaN or Inf")
    return value


@dataclasses.dataclass
class Strategy:
    """FedAvg's behaviour; subclasses override what their published rule changes."""

    name: ClassVar[str] = ""
    # True when the aggregator keeps every delta of the round (memory grows with the
    # sampled clients): said in --help and the README.
    holds_updates: ClassVar[bool] = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hints.get(f.name) is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise StrategyError(f"{flag(f.name)} must be a finite number, got {value!r}")
                setattr(self, f.name, float(value))
        self.validate()

    def require(self, field_name: str, ok: bool, requirement: str) -> None:
        """``validate()``'s one check: "--mu must be >= 0, got -1" unless ``ok``."""
        if not ok:
            value = getattr(self, field_name)
            shown = f"{value:g}" if isinstance(value, float) else repr(value)
            raise StrategyError(f"{flag(field_name)} must be {requirement}, got {shown}")

    def validate(self) -> None:
        """Raise StrategyError for a parameter outside its published range."""

    def fit_config(self, round_num: int) -> dict[str, float]:
        """Extra keys for the clients' training config this round."""
        return {}

    def aggregator(self, numel: int) -> Aggregator:
        return MeanAggregator(numel)

    def server_update(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Next global weights (float32) from the current ones and the aggregate delta."""
        return (weights.double() + delta).float()

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state (tensors and numbers) for the checkpoint: {} when stateless;
        else ``{"strategy": name, "step": rounds applied, ...tensors or None}``, loadable
        with ``torch.load(weights_only=True)``. Its tensors are never modified afterwards."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any], numel: int | None = None) -> None:
        """Restore :meth:`state_dict`'s output; raise StrategyError if it does not fit:
        another strategy's, missing keys, NaN, or (given ``numel``, the model's float count)
        vectors of another size, which :meth:`server_update` would refuse on every attempt
        of the first round after a resume. Stateless strategies ignore it."""

    @classmethod
    def parameters(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}
