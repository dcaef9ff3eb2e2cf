"""Which connected clients train this round: a pure function of the seed and the round.

The sample is drawn from a generator seeded with (seed, round, attempt), not from one
long-lived RNG: a resumed run draws exactly what the uninterrupted run would have, with no
sampler state to save, and two runs with the same seed and the same connected ids sample
the same clients.
"""
from __future__ import annotations

import math
import random
from typing import Iterable


def sample_size(connected: int, fraction: float, min_fit: int) -> int:
    """``max(min_fit, ceil(fraction * connected))``, never more than are connected."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(connected, max(min_fit, math.ceil(fraction * connected - 1e-9)))


def sample_clients(ids: Iterable[int], fraction: float, min_fit: int, seed: int, round_num: int,
                   attempt: int = 0) -> list[int]:
    """The sampled client ids, sorted; every id when the fraction covers them all."""
    pool = sorted(set(ids))
    k = sample_size(len(pool), fraction, min_fit)
    if k >= len(pool):
        return pool
    rng = random.Random(f"{seed}/{round_num}/{attempt}")  # str seeds hash with SHA-512: stable
    return sorted(rng.sample(pool, k))
