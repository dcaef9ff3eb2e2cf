"""DP-FedAvg whose clip norm tracks a quantile of the update norms, privately.

Andrew, Thakkar, McMahan, Ramaswamy 2021 ("Differentially Private Learning with Adaptive
Clipping", NeurIPS): a fixed C is either too small (clipping distorts every update) or
too large (noise z C / m drowns them), and the right value drifts during training. Each
round the server also releases, with its own Gaussian noise, the fraction of sampled
clients whose update norm was <= C,

    b~ = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2,   b_i = 1[||delta_i|| <= C],

and moves C geometrically toward the target quantile gamma of the norms:

    C <- C * exp(-eta_C * (b~ - gamma)).

Centring b_i at 1/2 halves the count's sensitivity to 1/2, so releasing it is a Gaussian
mechanism of noise multiplier 2 sigma_b. Two Gaussian mechanisms on the same sample
compose to one of multiplier (z_delta^-2 + (2 sigma_b)^-2)^-1/2, so to spend the budget
of a single noise multiplier z the deltas get

    z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2        (the paper's Section 3; needs 2 sigma_b > z)

and the accountant is given z itself (``tests/test_privacy.py`` checks with dp-accounting
that the composition of the two equals z). The paper recommends gamma = 0.5,
eta_C = 0.2, sigma_b = m / 20 and an initial C of 0.1; TF Privacy's
``QuantileAdaptiveClipSumQuery`` is the reference implementation.

Adaptive clipping needs the unclipped norm of each update, so it runs with server-side
clipping only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional

import torch

from fl.privacy.fixed_clipping import DPFixedClipping, DPMeanAggregator
from fl.strategies.base import StrategyError


def default_clipped_count_stddev(sampled: int) -> float:
    """sigma_b = m / 20, Andrew et al.'s recommendation (and TFF's default)."""
    return sampled / 20.0


def adaptive_delta_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2: the deltas' share of a total multiplier z
    when the clipped count is released with noise std sigma_b (Andrew et al. 2021)."""
    if noise_multiplier == 0:
        return 0.0
    if not 2 * clipped_count_stddev > noise_multiplier:
        raise StrategyError(
            f"adaptive clipping with noise multiplier {noise_multiplier:g} needs a clipped-count "
            f"noise std > {noise_multiplier / 2:g}, got {clipped_count_stddev:g} "
            "(the default is m/20: sample more clients per round or set --dp-clipped-count-stddev)")
    return (noise_multiplier ** -2 - (2 * clipped_count_stddev) ** -2) ** -0.5


@dataclasses.dataclass
class DPAdaptiveClipping(DPFixedClipping):
    """:class:`DPFixedClipping` whose ``clip_norm`` (the initial C) follows the
    ``target_quantile`` of update norms at rate ``clip_lr``; ``clipped_count_stddev``
    None means m / 20 each round. ``noise_multiplier`` is the total z, for the accountant."""

    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clipped_count_stddev: Optional[float] = None

    name: ClassVar[str] = "dp-adaptive-clipping"

    def __post_init__(self) -> None:
        self.last_unclipped_fraction: Optional[float] = None
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.clipping != "server":
            raise StrategyError("adaptive clipping needs --dp-clipping server: it counts the unclipped norms")
        if not 0.0 <= self.target_quantile <= 1.0:
            raise StrategyError(f"--dp-target-quantile must be in [0, 1], got {self.target_quantile}")
        if not (math.isfinite(self.clip_lr) and self.clip_lr >= 0):
            raise StrategyError(f"--dp-clip-lr must be >= 0, got {self.clip_lr}")
        if self.clipped_count_stddev is not None:
            if not (math.isfinite(self.clipped_count_stddev) and self.clipped_count_stddev > 0):
                raise StrategyError(f"--dp-clipped-count-stddev must be > 0, got {self.clipped_count_stddev}")
            adaptive_delta_noise_multiplier(self.noise_multiplier, self.clipped_count_stddev)  # refuse now, not at round 1

    def count_stddev(self) -> float:
        """sigma_b this round."""
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return default_clipped_count_stddev(self.sampled)

    def begin_round(self, sampled: int) -> None:
        super().begin_round(sampled)
        adaptive_delta_noise_multiplier(self.noise_multiplier, self.count_stddev())  # one clear line if m is too small

    @property
    def delta_noise_multiplier(self) -> float:
        return adaptive_delta_noise_multiplier(self.noise_multiplier, self.count_stddev())

    def _released(self, aggregator: DPMeanAggregator) -> None:
        """Release the noised unclipped fraction and move C for the next round."""
        sampled = aggregator.sampled
        centred = aggregator.unclipped - aggregator.count / 2.0
        noise = float(torch.randn((), generator=self.generator, dtype=torch.float64)) * self.count_stddev()
        fraction = (centred + noise) / sampled + 0.5
        self.last_unclipped_fraction = fraction
        self.clip_norm = self.clip_norm * math.exp(-self.clip_lr * (fraction - self.target_quantile))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict[str, Any], numel: int | None = None) -> None:
        super().load_state_dict(state, numel)
        clip_norm = state.get("clip_norm")
        if not isinstance(clip_norm, float) or not (math.isfinite(clip_norm) and clip_norm > 0):
            raise StrategyError(f"checkpoint holds no valid adaptive clip norm: {clip_norm!r}")
        self.clip_norm = clip_norm

    def describe(self) -> str:
        return (f"DP-FedAvg (adaptive clipping): C0={self.clip_norm:g}, z={self.noise_multiplier:g} "
                f"(deltas {self.delta_noise_multiplier if self._sampled else float('nan'):.4g}), "
                f"quantile {self.target_quantile:g}, lr {self.clip_lr:g}, around "
                f"{self.inner.name or type(self.inner).__name__}")
