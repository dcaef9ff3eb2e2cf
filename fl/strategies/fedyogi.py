"""FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2):

    v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)

(v moves towards Delta_t^2 by a step of (1 - beta2) Delta_t^2, additively, where Adam
moves by a fraction of the gap); the rest in :mod:`strategies.adaptive`. Defaults are
Flower's FedYogi: eta = 0.01, beta1 = 0.9, beta2 = 0.99, tau = 1e-3.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from fl.strategies.adaptive import (
    BETA1_HELP,
    BETA2_HELP,
    SERVER_LR_HELP,
    TAU_HELP,
    AdaptiveStrategy,
    yogi_second_moment,
)
from fl.strategies.base import param


@dataclasses.dataclass
class FedYogi(AdaptiveStrategy):
    name: ClassVar[str] = "fedyogi"

    server_lr: float = param(0.01, SERVER_LR_HELP)
    beta1: float = param(0.9, BETA1_HELP)
    beta2: float = param(0.99, BETA2_HELP)
    tau: float = param(1e-3, TAU_HELP)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return yogi_second_moment(v, delta_sq, self.beta2)
