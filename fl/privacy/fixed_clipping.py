"""DP-FedAvg with a fixed clip norm, as a wrapper around any averaging strategy.

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language Models", ICLR)
make FedAvg client-level differentially private: each sampled client's delta is clipped
to L2 norm <= C, the clipped deltas are averaged with *uniform* weights over the m
clients sampled, and Gaussian noise N(0, (z C / m)^2) is added to the average. One client
then moves the sum by at most C (2C if it is replaced by another), whatever its data, and
the noise hides that move; the accountant (``privacy.accountant``) turns z, m/N and the
number of rounds into (epsilon, delta). Whatever the inner strategy then does with the
noised average (FedAvg's ``w + delta``, FedAdam's moments, ...) is post-processing and
costs no privacy. This is Flower's ``DifferentialPrivacyServerSideFixedClipping`` /
``...ClientSideFixedClipping`` pair, as one wrapper with a ``clipping`` mode.

**m** is the number of clients *sampled* for the round (sent the model), fixed by
:meth:`DPFixedClipping.begin_round` before any update is seen. If only k < m updates
arrive (dropouts, timeouts), the sum of the k clipped deltas is still divided by m and
the noise stays z C / m: the average shrinks toward zero by k/m (the fixed-denominator
estimator of McMahan et al. 2018), and the guarantee holds, since a missing client only
removes a term. Dividing by k would shrink the noise exactly when clients drop out.

Trust, by mode:

- ``clipping="server"``: clients send unclipped deltas; the server clips, averages and
  adds the noise. Clients trust the server with their raw updates and to add the noise
  honestly; the guarantee covers everything released after aggregation (the global
  models sent to clients, checkpoints, metrics), not the server itself. Nothing per client
  is released: the metrics and checkpoint hold no per-client record under DP
  (``server.evaluator``), the integer buffers are the server's own
  (:func:`global_counters`), and a refused update's reason carries no norm.
- ``clipping="client"``: each client clips its own delta (:func:`fl.common.vectors.clip_by_norm`,
  at the ``dp_clip_norm`` it receives in its training config) before sending; the server
  does not clip, refuses any delta longer than C (1 + ``norm_tolerance``) and adds the
  noise. The server still sees each clipped delta and must still be trusted to add the
  noise; what changes is that a client's raw delta never leaves it, and that the
  clipping no longer depends on the server (the step toward secure aggregation, where
  the server would see only the sum). Accepted norms go up to C (1 + tolerance), so the
  accountant must be given :attr:`DPFixedClipping.accounting_noise_multiplier`
  (z / (1 + tolerance)), not z.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Optional

import torch

from fl.common.layout import Layout, State
from fl.common.vectors import InvalidUpdate, fold, l2_norm
from fl.privacy.noise import add_gaussian_noise_
from fl.strategies.base import Aggregator, Strategy, StrategyError, check_sum

WEIGHTING_MESSAGE = ("--dp-noise-multiplier needs --weighting uniform: "
                     "a sample-count weight breaks the sensitivity bound")

CLIPPING_MODES = ("server", "client")


def check_weighting(weighting: str) -> None:
    """Refuse any weighting but uniform under DP (a client's sample count would scale its
    influence past C); raises StrategyError with the one line for the command line."""
    if weighting != "uniform":
        raise StrategyError(WEIGHTING_MESSAGE)


def global_counters(layout: Layout, state: State) -> torch.Tensor:
    """The next global model's integer buffers under DP, from the server's model ``state``.

    Clients' counters are not averaged in: BatchNorm's ``num_batches_tracked`` counts a
    client's local batches, an un-noised function of its sample count. The server advances
    each ``num_batches_tracked`` by one per round itself (ImprovedCNN's BatchNorm, with
    momentum 0.1, never reads it) and keeps any other integer buffer as it was.
    """
    ints = torch.empty(layout.int_numel, dtype=torch.int64)
    for e in layout.entries:
        if not e.dtype.is_floating_point:
            value = state[e.name].reshape(-1).to(torch.int64)
            ints[e.offset:e.offset + e.numel] = value + 1 if e.name.endswith("num_batches_tracked") else value
    return ints


class DPMeanAggregator:
    """Streaming sum of clipped deltas; ``result()`` = sum / m + N(0, noise_std^2), drawn once.

    Memory is one float64 model-sized sum, as for :class:`strategies.base.MeanAggregator`.
    ``weight`` is ignored: every delta counts 1/m. ``unclipped`` counts the deltas whose
    norm was <= C (the indicators adaptive clipping needs); ``norms`` is not kept.
    """

    def __init__(self, numel: int, *, clip_norm: float, sampled: int, noise_std: float,
                 generator: torch.Generator, clip_at_server: bool, norm_limit: float,
                 on_release: Optional[Callable[["DPMeanAggregator"], None]] = None) -> None:
        self.sum = torch.zeros(numel, dtype=torch.float64)
        self.clip_norm = clip_norm
        self.sampled = sampled
        self.noise_std = noise_std
        self.generator = generator
        self.clip_at_server = clip_at_server
        self.norm_limit = norm_limit
        self.on_release = on_release
        self.count = 0
        self.unclipped = 0
        self._result: Optional[torch.Tensor] = None

    def add(self, delta: torch.Tensor, weight: float) -> None:
        """Clip (server mode) or check (client mode) one delta and fold it; ``weight`` is ignored."""
        if self._result is not None:
            raise RuntimeError("the round's noised average was already released")
        if self.count >= self.sampled:
            raise ValueError(f"more updates than the {self.sampled} clients sampled this round")
        norm = l2_norm(delta)
        if not math.isfinite(norm):
            raise InvalidUpdate("update holds NaN or Inf")
        if self.clip_at_server:
            factor = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        elif norm > self.norm_limit:
            # No norm in the text: the reason is logged, and a norm is an un-noised statistic.
            raise InvalidUpdate(f"update norm exceeds the DP clip norm {self.clip_norm:.6g} "
                                "(client-side clipping: the client must clip its delta)")
        else:
            factor = 1.0
        fold(self.sum, delta.reshape(-1), factor)
        self.unclipped += int(norm <= self.clip_norm)
        self.count += 1

    def add_sum(self, total: torch.Tensor, count: int) -> None:
        """A secure sum of ``count`` deltas the clients clipped themselves; each counts 1/m."""
        if self._result is not None:
            raise RuntimeError("the round's noised average was already released")
        check_sum(total, self.sum.numel(), count)
        if self.count + count > self.sampled:
            raise ValueError(f"more updates than the {self.sampled} clients sampled this round")
        self.sum.add_(total)
        self.count += count

    def result(self) -> torch.Tensor:
        """The noised average (float64). Noise is drawn on the first call only: a second call
        returns the same tensor, never a second release."""
        if self._result is None:
            if self.count == 0:
                raise ValueError("no updates to aggregate")
            mean = self.sum.div_(self.sampled)  # in place: no second model-sized buffer
            self._result = add_gaussian_noise_(mean, self.noise_std, self.generator)
            if self.on_release is not None:
                self.on_release(self)
        return self._result


@dataclasses.dataclass
class DPFixedClipping(Strategy):
    """Client-level DP around ``inner``: clip to ``clip_norm``, uniform mean over the m
    sampled clients, noise std ``noise_multiplier * clip_norm / m``; the rest is ``inner``'s.

    Call :meth:`begin_round` with m before :meth:`aggregator` each round, and step the
    accountant once per released ``result()``. The generator comes from
    :func:`privacy.noise.make_generator`; its state is deliberately not checkpointed
    (a stored state would let a reader of the checkpoint replay the noise).
    """

    inner: Strategy
    noise_multiplier: float
    clip_norm: float
    generator: torch.Generator = dataclasses.field(repr=False)
    clipping: str = "server"
    norm_tolerance: float = 1e-3

    name: ClassVar[str] = "dp-fixed-clipping"
    clips_updates: ClassVar[bool] = True  # the server must not clip or screen before it

    def __post_init__(self) -> None:
        self._sampled: Optional[int] = None
        super().__post_init__()

    def validate(self) -> None:
        if not isinstance(self.inner, Strategy):
            raise StrategyError(f"DP wraps a strategy, got {type(self.inner).__name__}")
        if isinstance(self.inner, DPFixedClipping):
            raise StrategyError("DP is already applied by the inner strategy")
        if type(self.inner).aggregator is not Strategy.aggregator:
            raise StrategyError(f"DP needs a strategy that averages: {self.inner.name or type(self.inner).__name__} "
                                "replaces the mean, which breaks the sensitivity bound")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise StrategyError(f"--dp-noise-multiplier must be >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise StrategyError(f"--dp-clip-norm must be > 0, got {self.clip_norm}")
        if self.clipping not in CLIPPING_MODES:
            raise StrategyError(f"--dp-clipping must be one of {', '.join(CLIPPING_MODES)}, got {self.clipping!r}")
        if not (math.isfinite(self.norm_tolerance) and self.norm_tolerance >= 0):
            raise StrategyError(f"DP norm tolerance must be >= 0, got {self.norm_tolerance}")

    # --- the round -------------------------------------------------------------------

    def begin_round(self, sampled: int) -> None:
        """Fix m, the number of clients sampled this round (the divisor and noise scale)."""
        if isinstance(sampled, bool) or not isinstance(sampled, int) or sampled < 1:
            raise ValueError(f"sampled clients must be a positive int, got {sampled!r}")
        self._sampled = sampled

    @property
    def sampled(self) -> int:
        if self._sampled is None:
            raise RuntimeError("call begin_round(m) before aggregating a DP round")
        return self._sampled

    @property
    def delta_noise_multiplier(self) -> float:
        """z applied to the deltas: all of the noise multiplier for fixed clipping."""
        return self.noise_multiplier

    @property
    def accounting_noise_multiplier(self) -> float:
        """The z to give the accountant: noise std over the largest norm an accepted delta can have."""
        if self.clipping == "client":
            return self.noise_multiplier / (1.0 + self.norm_tolerance)
        return self.noise_multiplier

    def noise_std(self) -> float:
        """Std of the noise on this round's average: z C / m."""
        return self.delta_noise_multiplier * self.clip_norm / self.sampled

    def aggregator(self, numel: int) -> Aggregator:
        return DPMeanAggregator(
            numel, clip_norm=self.clip_norm, sampled=self.sampled, noise_std=self.noise_std(),
            generator=self.generator, clip_at_server=self.clipping == "server",
            norm_limit=self.clip_norm * (1.0 + self.norm_tolerance), on_release=self._released)

    def _released(self, aggregator: DPMeanAggregator) -> None:
        """Hook after the noised average is drawn (adaptive clipping updates C here)."""

    # --- delegated to the inner strategy ------------------------------------------------

    def fit_config(self, round_num: int) -> dict[str, float]:
        config = dict(self.inner.fit_config(round_num))
        if self.clipping == "client":
            config["dp_clip_norm"] = self.clip_norm
        return config

    def server_update(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.inner.server_update(weights, delta)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any], numel: int | None = None) -> None:
        if not isinstance(state, dict) or "inner" not in state:
            raise StrategyError("checkpoint has no DP strategy state (was it written without DP?)")
        self.inner.load_state_dict(state["inner"], numel)

    def describe(self) -> str:
        """One line for the log."""
        return (f"DP-FedAvg ({self.clipping}-side clipping): C={self.clip_norm:g}, "
                f"z={self.noise_multiplier:g}, around {self.inner.name or type(self.inner).__name__}")
