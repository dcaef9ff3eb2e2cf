"""What flows through a client's update steps, and what a step is.

A step takes the update so far and returns it changed (``Step.apply``), like
pfl-research's ``postprocess_one_user``: clipping moves the local state, quantization or
packing or masking makes the UPDATE body. The first step that makes a body ends the
encoding; later ones see it made (and may still change it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch


@dataclass(frozen=True)
class Update:
    """One client's trained model in one round, on its way to the UPDATE body."""

    round: int
    local: dict[str, torch.Tensor]  # the trained state (a copy: the host's model moves on)
    base: dict[str, torch.Tensor]  # the model the server sent
    num_samples: int
    metrics: dict[str, Any]
    generator: torch.Generator | None = None  # the round's: stochastic rounding draws from it
    quantizable: bool = True  # False once a step needs the exact float delta (DP clipping)
    body: dict[str, Any] | None = None  # the UPDATE body, once a step made it


class Step(Protocol):
    def apply(self, update: Update) -> Update: ...


def run_steps(steps: Sequence[Step], update: Update) -> dict[str, Any]:
    """The UPDATE body ``steps`` make of ``update``; a chain that makes none is a bug."""
    for step in steps:
        update = step.apply(update)
    if update.body is None:
        raise RuntimeError(f"no step of {[type(s).__name__ for s in steps]} made the UPDATE body")
    return update.body


def plain_body(update: Update, *, quantized: bool, **payload: Any) -> dict[str, Any]:
    """A plain (not masked) UPDATE body: the keys every server reads, then the model."""
    return {"round": update.round, "num_samples": update.num_samples, "metrics": update.metrics,
            "quantized": quantized, **payload}
