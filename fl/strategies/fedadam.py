"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2):

    v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2

the rest (m_t, x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau), no bias correction, v_{-1} =
tau^2) in :mod:`strategies.adaptive`. Defaults are Flower's FedAdam: eta = 0.1,
beta1 = 0.9, beta2 = 0.99, tau = 1e-9.
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
    adam_second_moment,
)
from fl.strategies.base import param


@dataclasses.dataclass
class FedAdam(AdaptiveStrategy):
    name: ClassVar[str] = "fedadam"

    server_lr: float = param(0.1, SERVER_LR_HELP)
    beta1: float = param(0.9, BETA1_HELP)
    beta2: float = param(0.99, BETA2_HELP)
    tau: float = param(1e-9, TAU_HELP)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return adam_second_moment(v, delta_sq, self.beta2)
