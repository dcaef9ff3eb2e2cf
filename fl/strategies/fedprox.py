"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks", MLSys).

Client k minimises its loss plus a proximal term that keeps it near the model it received:

    h_k(w) = F_k(w) + mu/2 * ||w - w_t||^2

(``fl.learning.training.train`` with ``TrainingConfig.mu``; the server sends ``mu`` in the training config). The
server side is FedAvg's: x_{t+1} = x_t + weighted mean of the deltas. mu = 0 is FedAvg.

Default mu = 0.01: Li et al. pick mu per task from {0.001, 0.01, 0.1, 1} (Flower has no
default); 0.01 is the middle of that grid and a mild pull for one local epoch.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from fl.strategies.base import param
from fl.strategies.fedavg import FedAvg


@dataclasses.dataclass
class FedProx(FedAvg):
    name: ClassVar[str] = "fedprox"

    mu: float = param(0.01, "FedProx proximal coefficient: clients add mu/2*||w - w_global||^2 to their loss")

    def validate(self) -> None:
        self.require("mu", self.mu >= 0, ">= 0")

    def fit_config(self, round_num: int) -> dict[str, float]:
        return {"mu": self.mu}
