"""FedAvgM: FedAvg with server momentum (Hsu, Qi & Brown, 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", arXiv:1909.06335).

The server treats the negated mean delta as a gradient (the pseudo-gradient) and takes a
heavy-ball SGD step on it, in Flower's and ``torch.optim.SGD``'s convention:

    g_t     = -Delta_t = x_t - mean_i(x_i)            (pseudo-gradient)
    v_t     = beta * v_{t-1} + g_t                      v_0 = 0, so v_1 = g_1
    x_{t+1} = x_t - eta * v_t

Hsu et al. write v <- beta v + Delta w; w <- w - v, i.e. eta = 1. beta = 0 with eta = 1 is
FedAvg. eta = ``server_lr``, default 1.0 (Hsu et al.'s form; Flower's default too);
beta = ``server_momentum``, default 0.9 (one of the values Hsu et al. sweep; Flower's
default is 0, i.e. no momentum). Hsu et al. reason in terms of the effective learning rate
eta / (1 - beta): it is 10 with these defaults, so a steady drift is amplified up to
tenfold; lower ``--server-lr`` (0.1 gives an effective 1) if rounds overshoot.

State: the momentum buffer v (float64, one model) and the step count. Each step makes a
new buffer, so tensors returned by :meth:`state_dict` never change afterwards.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import torch

from fl.strategies.base import Strategy, StrategyError, checked_state, checked_vector, param


def momentum_step(x: torch.Tensor, v: torch.Tensor | None, delta: torch.Tensor, eta: float,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One FedAvgM step in float64: (x_{t+1}, v_t) from x_t, v_{t-1} (None before the first
    round) and the mean delta Delta_t."""
    g = -delta.to(torch.float64)
    v = g if v is None else beta * v + g
    return x.to(torch.float64) - eta * v, v


@dataclasses.dataclass
class FedAvgM(Strategy):
    name: ClassVar[str] = "fedavgm"

    server_lr: float = param(1.0, "server learning rate eta")
    server_momentum: float = param(0.9, "FedAvgM server momentum beta, in [0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.velocity: torch.Tensor | None = None
        self.step = 0

    def validate(self) -> None:
        self.require("server_lr", self.server_lr > 0, "> 0")
        self.require("server_momentum", 0 <= self.server_momentum < 1, "in [0, 1)")

    def server_update(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.velocity is not None and self.velocity.numel() != delta.numel():
            raise StrategyError(f"fedavgm state is for {self.velocity.numel()} values, the update has {delta.numel()}")
        x, self.velocity = momentum_step(weights, self.velocity, delta, self.server_lr, self.server_momentum)
        self.step += 1
        return x.float()

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, "step": self.step, "velocity": self.velocity}

    def load_state_dict(self, state: Mapping[str, Any], numel: int | None = None) -> None:
        step = checked_state(state, self.name, {"velocity"})
        velocity = state["velocity"]
        if (step == 0) != (velocity is None):
            has = "has" if velocity is not None else "lacks"
            raise StrategyError(f"fedavgm state at step {step} {has} a momentum buffer")
        self.velocity = None if velocity is None else checked_vector(velocity, "fedavgm momentum", numel)
        self.step = step
