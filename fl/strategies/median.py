"""Coordinate-wise median (Yin et al., 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML):

    Delta_t[j] = median_i Delta_i[j]          for every coordinate j
    x_{t+1}    = x_t + Delta_t

(mean of the two middle values for an even number of clients). Client weights (sample
counts) are ignored: a client's claim of many samples buys it nothing. Holds the round's
deltas: memory = sampled clients x model size x 4 bytes (see :mod:`strategies.robust`).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from fl.strategies.base import Aggregator, Strategy
from fl.strategies.robust import HeldDeltas, coordinate_median


@dataclasses.dataclass
class Median(Strategy):
    name: ClassVar[str] = "median"
    holds_updates: ClassVar[bool] = True

    def aggregator(self, numel: int) -> Aggregator:
        return HeldDeltas(numel, coordinate_median)
