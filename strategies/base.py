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

Which clients train, the sample-count weighting, norm clipping, validation and the
integer buffers (BatchNorm's counters) are the server's business, not the strategy's.

A strategy is a dataclass: its fields are its parameters, and ``server.py`` turns every
field of every strategy into a command-line flag (``server_lr`` -> ``--server-lr``), so
adding a strategy is adding one file to this folder.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

import torch


class StrategyError(ValueError):
    """A bad strategy name or parameter; ``str(e)`` is one line for the command line."""


class Aggregator(Protocol):
    """One round's fold of client deltas."""

    count: int

    def add(self, delta: torch.Tensor, weight: float) -> None:
        """Fold one (validated, float32, flat) delta; ``weight`` > 0."""

    def result(self) -> torch.Tensor:
        """The aggregate delta, float64, same length as the deltas."""


_SLICE = 1 << 17  # elements per step: a float64 temporary of 1 MiB at most


class MeanAggregator:
    """Streaming weighted mean in float64: arrival order does not change the result,
    and no list of deltas is ever held."""

    def __init__(self, numel: int) -> None:
        self.sum = torch.zeros(numel, dtype=torch.float64)
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: torch.Tensor, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        # In slices: a float32 operand of a float64 add is cast whole otherwise.
        for i in range(0, delta.numel(), _SLICE):
            self.sum[i:i + _SLICE].add_(delta[i:i + _SLICE], alpha=weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        return self.sum / self.total_weight


@dataclasses.dataclass
class Strategy:
    """FedAvg's behaviour; subclasses override what their published rule changes."""

    name: ClassVar[str] = ""
    # True when the aggregator keeps every delta of the round (memory grows with the
    # sampled clients): said in --help and the README.
    holds_updates: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

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
        """Optimizer state (tensors and numbers) for the checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; raise StrategyError if it does not fit."""

    @classmethod
    def parameters(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}
