"""Coordinate-wise robust aggregation (Yin, Chen, Ramchandran & Bartlett, 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML): the
shared part of ``median`` and ``trimmed-mean``.

A robust statistic needs every value of a coordinate at once, so :class:`HeldDeltas` keeps
the round's deltas: memory is (sampled clients) x (model size) x 4 bytes (one float32 row
per client), plus a temporary of about 4 MiB x 3 while reducing, as coordinates are
reduced in chunks.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from fl.strategies.base import check_delta

_CHUNK_BYTES = 4 << 20  # float32 (clients x chunk) block reduced at a time


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Per-column median of a (clients, coordinates) block, float64. With an even number of
    rows, the mean of the two middle values (numpy's and Flower's convention; torch.median
    would return the lower one)."""
    n = stack.shape[0]
    s = stack.sort(dim=0).values
    return (s[(n - 1) // 2].to(torch.float64) + s[n // 2].to(torch.float64)) / 2


def trim_count(n: int, trim_fraction: float) -> int:
    """Values dropped at each end of a coordinate: floor(trim_fraction * n) (the 1e-9 guards
    against 0.29 * 100 = 28.999...)."""
    return math.floor(trim_fraction * n + 1e-9)


def trimmed_mean(stack: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Per-column mean of a (clients, coordinates) block after dropping the
    ``trim_count(n, trim_fraction)`` largest and smallest values of each column, float64."""
    n = stack.shape[0]
    k = trim_count(n, trim_fraction)
    kept = stack.sort(dim=0).values[k:n - k] if k else stack
    return kept.to(torch.float64).mean(dim=0)


class HeldDeltas:
    """An aggregator that keeps a float32 copy of each delta (the server reuses its receive
    buffers) and reduces them coordinate-chunk by chunk with ``reduce``. Weights are checked
    but not used: robust statistics count clients, not samples."""

    def __init__(self, numel: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.numel = numel
        self.reduce = reduce
        self.rows: list[torch.Tensor] = []
        self.count = 0

    def add(self, delta: torch.Tensor, weight: float) -> None:
        check_delta(delta, self.numel, weight)
        self.rows.append(delta.detach().to("cpu", torch.float32, copy=True))
        self.count += 1

    def add_sum(self, total: torch.Tensor, count: int) -> None:
        raise TypeError(f"{type(self).__name__} cannot take a secure sum (it needs each update)")

    def result(self) -> torch.Tensor:
        if not self.rows:
            raise ValueError("no updates to aggregate")
        out = torch.empty(self.numel, dtype=torch.float64)
        chunk = max(1, _CHUNK_BYTES // (4 * len(self.rows)))
        for i in range(0, self.numel, chunk):
            out[i:i + chunk] = self.reduce(torch.stack([r[i:i + chunk] for r in self.rows]))
        return out
