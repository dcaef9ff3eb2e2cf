"""Which connected clients train this round.

Without DP the sample is a pure function of the seed and the round: it is drawn from a
generator seeded with (seed, round, attempt), not from one long-lived RNG, so a resumed run
draws exactly what the uninterrupted run would have, with no sampler state to save, and two
runs with the same seed and the same connected ids sample the same clients.

Under DP (``seed=None``) that reproducibility is exactly what must not hold: the accountant's
amplification by sampling assumes nobody can tell which clients a round sampled, and
``--seed`` is public (it is in the checkpoint). So the sample is drawn from the operating
system's CSPRNG (``secrets.SystemRandom``): no state, nothing on disk, not reproducible.
"""
from __future__ import annotations

import math
import random
import secrets
from typing import Iterable

SECRET_SAMPLING = ("client sampling: drawn each round from the OS CSPRNG (not reproducible from --seed, "
                   "never stored), as the accountant's amplification by sampling assumes")


def sample_size(connected: int, fraction: float, min_fit: int) -> int:
    """``max(min_fit, ceil(fraction * connected))``, never more than are connected."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(connected, max(min_fit, math.ceil(fraction * connected - 1e-9)))


def sample_clients(ids: Iterable[int], fraction: float, min_fit: int, seed: int | None, round_num: int,
                   attempt: int = 0) -> list[int]:
    """The sampled client ids, sorted; every id when the fraction covers them all.
    ``seed=None`` (DP) draws from the OS CSPRNG instead of (seed, round, attempt)."""
    pool = sorted(set(ids))
    k = sample_size(len(pool), fraction, min_fit)
    if k >= len(pool):
        return pool
    if seed is None:
        rng: random.Random = secrets.SystemRandom()
    else:
        rng = random.Random(f"{seed}/{round_num}/{attempt}")  # str seeds hash with SHA-512: stable
    return sorted(rng.sample(pool, k))
