"""Client-side DP clipping (DP-FedAvg): the raw delta never leaves the client."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fl.client.steps.base import Update
from fl.common.layout import Layout
from fl.common.vectors import clip_by_norm


@dataclass(frozen=True)
class Clip:
    """Bound the float delta's L2 norm by ``norm``; turns 8-bit quantization off for this
    update, whose rounding could push the norm past the bound the server checks."""

    norm: float

    def apply(self, update: Update) -> Update:
        return dataclasses.replace(update, local=clip_delta(update.local, update.base, self.norm), quantizable=False)


def clip_delta(local: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
               clip_norm: float) -> dict[str, torch.Tensor]:
    """``local`` moved back toward ``base`` so the float delta has L2 norm <= ``clip_norm``;
    integer counters are kept as trained."""
    layout = Layout.of(local)
    floats, ints = layout.flatten(local)
    base_floats, _ = layout.flatten(base)
    delta, _ = clip_by_norm(floats - base_floats, clip_norm)
    return layout.unflatten(base_floats + delta, ints)
