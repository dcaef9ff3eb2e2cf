"""Client-level differential privacy for the federation (DP-FedAvg), in pure parts.

- clipping itself is ``fl.common.vectors.clip_by_norm`` (also what a client calls on its own delta).
- ``noise``: the noise generator, seeded from the OS CSPRNG unless a seed is given.
- ``fixed_clipping``: ``DPFixedClipping``, a wrapper around any averaging strategy
  (McMahan et al. 2018), with server-side or client-side clipping.
- ``adaptive_clipping``: ``DPAdaptiveClipping``, the clip norm following a quantile of
  the update norms (Andrew et al. 2021).
- ``accountant``: ``PrivacyAccountant``, epsilon from dp-accounting's RDP accountant, at
  the sampling rate each round realised.

The server owns the wiring: ``check_weighting`` at start, ``begin_round(m)`` before each
round's ``aggregator``, ``global_counters`` for the new model's integer buffers,
``accountant.step(n, m)`` after each released aggregate, the accountant's state in the
checkpoint.

``PrivacyAccountant`` and ``default_delta`` are imported on first use: dp-accounting
brings scipy and mpmath, slow imports that a run without DP should not pay for.
"""
from __future__ import annotations

from typing import Any

from fl.privacy.adaptive_clipping import (
    DPAdaptiveClipping,
    adaptive_delta_noise_multiplier,
    default_clipped_count_stddev,
)
from fl.privacy.fixed_clipping import (
    WEIGHTING_MESSAGE,
    DPFixedClipping,
    DPMeanAggregator,
    check_weighting,
    global_counters,
)
from fl.privacy.noise import add_gaussian_noise_, make_generator

__all__ = [
    "DPAdaptiveClipping", "DPFixedClipping", "DPMeanAggregator", "PrivacyAccountant",
    "WEIGHTING_MESSAGE", "adaptive_delta_noise_multiplier", "add_gaussian_noise_",
    "check_weighting", "default_clipped_count_stddev", "default_delta", "global_counters", "make_generator",
]


def __getattr__(name: str) -> Any:
    if name in ("PrivacyAccountant", "default_delta"):
        from fl.privacy import accountant
        return getattr(accountant, name)
    raise AttributeError(f"module 'privacy' has no attribute {name!r}")
