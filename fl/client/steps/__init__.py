"""A client's update path as one chain of steps, one file each:

  local training ─▶ ``Clip`` (client-side DP) ─▶ ``Quantize`` (8-bit) or ``Pack`` (floats),
  or ``Mask`` (secure aggregation) ─▶ the UPDATE body.

A new client-side step is one new file with a class whose ``apply(Update) -> Update``
returns the update changed; ``Participant.update_steps`` says where it goes."""
from __future__ import annotations

from fl.client.steps.base import Step, Update, run_steps
from fl.client.steps.clip import Clip
from fl.client.steps.pack import Pack
from fl.client.steps.quantize import Quantize

__all__ = ["Clip", "Pack", "Quantize", "Step", "Update", "plain_steps", "run_steps"]


def plain_steps(quantization: bool, stochastic: bool, dp_clip_norm: float | None) -> list[Step]:
    """The chain of a round without secure aggregation."""
    steps: list[Step] = [] if dp_clip_norm is None else [Clip(dp_clip_norm)]
    if quantization:
        steps.append(Quantize(stochastic))
    steps.append(Pack())
    return steps
