"""Flat float vectors: finiteness, L2 norms in float64 and clipping, and the sliced
float64 fold that the server's sums use. Pure tensor math, shared by both sides."""
from __future__ import annotations

import math
from typing import Iterator

import torch


class InvalidUpdate(ValueError):
    """An update that must not enter the average (wrong keys, shapes, dtypes or values)."""


def finite(value: torch.Tensor) -> bool:
    """All values finite: min and max propagate NaN and show +-Inf, so one reduction
    without a bool tensor the size of the input (which ``isfinite().all()`` builds)."""
    lo, hi = torch.aminmax(value)
    return bool(lo.isfinite() & hi.isfinite())


FOLD_SLICE = 1 << 17  # elements: a 1 MiB float64 temporary at most


def slices(numel: int) -> Iterator[slice]:
    """Consecutive spans of ``FOLD_SLICE`` elements covering ``numel``: float64 work on a
    float32 vector one span at a time never needs a model-sized float64 copy."""
    for i in range(0, numel, FOLD_SLICE):
        yield slice(i, i + FOLD_SLICE)


def fold(dst: torch.Tensor, src: torch.Tensor, weight: float) -> None:
    """dst += weight * src in slices: torch casts a float32 operand of a float64 add to a
    float64 temporary of its full size, so whole-vector adds would allocate one per update."""
    for span in slices(src.numel()):
        dst[span].add_(src[span], alpha=weight)


def l2_norm(t: torch.Tensor) -> float:
    """The L2 norm of all of ``t``'s values, accumulated in float64 (in slices, so a float32
    input is never copied whole to float64). NaN or Inf anywhere gives a non-finite result."""
    flat = t.detach().reshape(-1)
    total = 0.0
    for span in slices(flat.numel()):
        part = flat[span].to(torch.float64)
        total += float(torch.dot(part, part))
    return math.sqrt(total)


def clip_by_norm(delta: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, float]:
    """``delta`` scaled down to an L2 norm of at most ``max_norm`` (up to the rounding of its
    dtype, ~1e-7 relative for float32), and its original norm.

    At or below ``max_norm`` the very same tensor comes back (no copy); above, a new one
    ``delta * (max_norm / norm)``. A NaN or Inf anywhere in it raises :class:`InvalidUpdate`:
    such a vector has no direction to keep.
    """
    if not 0 < max_norm < math.inf:
        raise ValueError(f"max_norm must be positive and finite, got {max_norm!r}")
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise InvalidUpdate(f"update norm is {norm} (it holds NaN or Inf)")
    if norm <= max_norm:
        return delta, norm
    return delta * (max_norm / norm), norm
