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


def sample_one(ids: Iterable[int], seed: int | None, number: int) -> int:
    """One idle client for an asynchronous dispatch, drawn from (seed, dispatch number) as a
    round's sample is from (seed, round), or from the OS CSPRNG under DP (``seed=None``)."""
    pool = sorted(set(ids))
    if not pool:
        raise ValueError("no client to sample from")
    rng: random.Random = secrets.SystemRandom() if seed is None else random.Random(f"{seed}/dispatch/{number}")
    return rng.choice(pool)
