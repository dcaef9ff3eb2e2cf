"""FedAdagrad (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2):

    v_t = v_{t-1} + Delta_t^2

the rest in :mod:`strategies.adaptive`. No beta2 (the rule has none). Defaults are
Flower's FedAdagrad: eta = 0.1, tau = 1e-9 and beta1 = 0 (no momentum: m_t = Delta_t, the
classic Adagrad step; Algorithm 2 allows momentum, so ``--beta1`` is offered).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from fl.strategies.adaptive import BETA1_HELP, SERVER_LR_HELP, TAU_HELP, AdaptiveStrategy, adagrad_second_moment
from fl.strategies.base import param


@dataclasses.dataclass
class FedAdagrad(AdaptiveStrategy):
    name: ClassVar[str] = "fedadagrad"

    server_lr: float = param(0.1, SERVER_LR_HELP)
    beta1: float = param(0.0, BETA1_HELP)
    tau: float = param(1e-9, TAU_HELP)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return adagrad_second_moment(v, delta_sq)
