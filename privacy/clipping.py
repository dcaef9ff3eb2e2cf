"""L2 clipping of a flat update: the step that bounds one client's influence.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models", Algorithm 1) scales each client's delta so its L2 norm is at most the clip norm
C; the Gaussian noise added to the average is calibrated to that bound, so a delta that
escapes clipping escapes the guarantee.

``clip_update`` has the same contract as ``aggregation.clip_by_norm`` (``(clipped,
original_norm)``): one of the two can alias the other.
"""
from __future__ import annotations

import math

import torch

_SLICE = 1 << 17  # elements per step: a float64 temporary of 1 MiB at most


def l2_norm(delta: torch.Tensor) -> float:
    """L2 norm accumulated in float64, slice by slice: exact enough to compare against C
    (a float32 sum of 400k squares loses ~3 digits) without a model-sized float64 copy."""
    flat = delta.detach().reshape(-1)
    total = 0.0
    for i in range(0, flat.numel(), _SLICE):
        s = flat[i:i + _SLICE].to(torch.float64)
        total += float(torch.dot(s, s))
    return math.sqrt(total)


def clip_factor(norm: float, clip_norm: float) -> float:
    """The scale min(1, C / norm) that brings a vector of ``norm`` within ``clip_norm``."""
    if not clip_norm > 0:
        raise ValueError(f"clip norm must be positive, got {clip_norm}")
    if not math.isfinite(norm):
        raise ValueError("cannot clip a vector with NaN or Inf")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clip_update(delta: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """``(delta scaled to L2 norm <= clip_norm, delta's original norm)``.

    A delta already within the bound is returned as is (the same tensor, not a copy);
    a longer one is returned as a new tensor scaled by ``clip_norm / norm``, so its norm
    is ``clip_norm`` up to float rounding (relative 1e-6). This is what a client calls on
    its own delta in client-side clipping mode, before it sends it.
    """
    norm = l2_norm(delta)
    factor = clip_factor(norm, clip_norm)
    if factor == 1.0:
        return delta, norm
    return delta * factor, norm
