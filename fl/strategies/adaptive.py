"""Adaptive server optimisers: Reddi et al., 2021, "Adaptive Federated Optimization" (ICLR),
Algorithm 2. FedAdagrad, FedAdam and FedYogi share everything but the second-moment rule,
which is each subclass's only override (``second_moment``).

Each round, with Delta_t the clients' weighted mean delta (mean(x_i) - x_t):

    m_t     = beta1 * m_{t-1} + (1 - beta1) * Delta_t            m_{-1} = 0
    v_t     = rule(v_{t-1}, Delta_t^2)                            v_{-1} = tau^2
              Adagrad: v_{t-1} + Delta_t^2
              Adam:    beta2 * v_{t-1} + (1 - beta2) * Delta_t^2
              Yogi:    v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

This is the paper's Algorithm 2 as printed, not Flower's variant, for one rule for all three
and a state that means what the paper says:
- no bias correction. Flower's FedAdam (only FedAdam) multiplies eta by
  sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)), t = round number; without it, steps in the
  first tens of rounds are up to ~2x those of a bias-corrected Adam (beta 0.9/0.99) when
  the deltas keep one direction, and the same size in round 1;
- v starts at tau^2 (Algorithm 2 asks for v_{-1} >= tau^2); Flower starts it at 0. With
  tau = 1e-9 that is invisible; with FedYogi's tau = 1e-3 it slows the first step of
  coordinates whose |Delta| < tau.

Defaults are Flower's (the paper tunes eta and tau per task on a grid): see each
strategy's module.

State (``state_dict``): the step count and m, v as float64 vectors (two models' worth);
each step makes new tensors, so what ``state_dict`` returned never changes afterwards.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from fl.strategies.base import Strategy, StrategyError, checked_state, checked_vector, param

SERVER_LR_HELP = "server learning rate eta"
BETA1_HELP = "adaptive optimisers' first-moment decay beta1, in [0, 1)"
BETA2_HELP = "FedAdam/FedYogi second-moment decay beta2, in [0, 1)"
TAU_HELP = "adaptivity tau (> 0): added to sqrt(v); v starts at tau^2"


def first_moment(m: torch.Tensor, delta: torch.Tensor, beta1: float) -> torch.Tensor:
    return beta1 * m + (1 - beta1) * delta


def adagrad_second_moment(v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
    return v + delta_sq


def adam_second_moment(v: torch.Tensor, delta_sq: torch.Tensor, beta2: float) -> torch.Tensor:
    return beta2 * v + (1 - beta2) * delta_sq


def yogi_second_moment(v: torch.Tensor, delta_sq: torch.Tensor, beta2: float) -> torch.Tensor:
    return v - (1 - beta2) * delta_sq * torch.sign(v - delta_sq)


def adaptive_step(x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, eta: float, tau: float) -> torch.Tensor:
    return x + eta * m / (v.sqrt() + tau)


@dataclasses.dataclass
class AdaptiveStrategy(Strategy):
    """Algorithm 2 without its v-rule; no ``name``, so not a strategy of its own."""

    server_lr: float = param(0.1, SERVER_LR_HELP)
    beta1: float = param(0.9, BETA1_HELP)
    tau: float = param(1e-9, TAU_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.step = 0

    def validate(self) -> None:
        self.require("server_lr", self.server_lr > 0, "> 0")
        for beta in ("beta1", "beta2"):
            if hasattr(self, beta):
                self.require(beta, 0 <= getattr(self, beta) < 1, "in [0, 1)")
        self.require("tau", self.tau > 0, "> 0")

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t-1} and Delta_t^2 (elementwise): the subclass's rule."""
        raise NotImplementedError

    def server_update(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        delta = delta.to(torch.float64)
        if self.m is None or self.v is None:
            m, v = torch.zeros_like(delta), torch.full_like(delta, self.tau ** 2)
        elif self.m.numel() != delta.numel():
            raise StrategyError(f"{self.name} state is for {self.m.numel()} values, the update has {delta.numel()}")
        else:
            m, v = self.m, self.v
        self.m = first_moment(m, delta, self.beta1)
        self.v = self.second_moment(v, delta * delta)
        self.step += 1
        return adaptive_step(weights.to(torch.float64), self.m, self.v, self.server_lr, self.tau).float()

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, "step": self.step, "m": self.m, "v": self.v}

    def load_state_dict(self, state: Mapping[str, Any], numel: int | None = None) -> None:
        step = checked_state(state, self.name, {"m", "v"})
        m, v = state["m"], state["v"]
        if step == 0:
            if m is not None or v is not None:
                raise StrategyError(f"{self.name} state at step 0 has moments")
            self.m = self.v = None
        else:
            m = checked_vector(m, f"{self.name} m", numel)
            v = checked_vector(v, f"{self.name} v", m.numel())
            if bool((v < 0).any()):
                raise StrategyError(f"saved {self.name} v has negative values")
            self.m, self.v = m, v
        self.step = step
