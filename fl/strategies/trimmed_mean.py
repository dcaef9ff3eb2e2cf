"""Coordinate-wise trimmed mean (Yin et al., 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML), with beta = ``trim_fraction``:

    k          = floor(beta * n)                    n = clients this round
    Delta_t[j] = mean of Delta_i[j] over i, after dropping the k largest and the k smallest
    x_{t+1}    = x_t + Delta_t

With fewer than 1/beta clients k is 0 and this is the unweighted mean (10 clients for the
default 0.1). beta must lie in [0, 0.5) so that at least one value remains. Client weights
are ignored, as for the median. Holds the round's deltas: memory = sampled clients x model
size x 4 bytes (see :mod:`strategies.robust`). Default 0.1 (Flower's FedTrimmedAvg uses 0.2).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

from fl.strategies.base import Aggregator, Strategy, param
from fl.strategies.robust import HeldDeltas, trimmed_mean


@dataclasses.dataclass
class TrimmedMean(Strategy):
    name: ClassVar[str] = "trimmed-mean"
    holds_updates: ClassVar[bool] = True

    trim_fraction: float = param(
        0.1, "trimmed mean: fraction of clients dropped at each end of every coordinate, in [0, 0.5)")

    def validate(self) -> None:
        self.require("trim_fraction", 0 <= self.trim_fraction < 0.5, "in [0, 0.5)")

    def aggregator(self, numel: int) -> Aggregator:
        return HeldDeltas(numel, functools.partial(trimmed_mean, trim_fraction=self.trim_fraction))
