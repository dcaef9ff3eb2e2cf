"""sampling.py: the size rule, determinism per (seed, round), and spread over rounds."""
from __future__ import annotations

import pytest

from fl.server.sampling import sample_clients, sample_size


@pytest.mark.parametrize("connected, fraction, min_fit, expected", [
    (100, 0.1, 1, 10), (6, 0.5, 1, 3), (7, 0.5, 1, 4), (10, 0.1, 3, 3), (2, 0.1, 5, 2), (1000, 0.01, 1, 10),
    (3, 1.0, 1, 3),
])
def test_size_is_max_of_min_fit_and_ceil_fraction(connected, fraction, min_fit, expected):
    assert sample_size(connected, fraction, min_fit) == expected


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_bad_fraction_is_refused(fraction):
    with pytest.raises(ValueError, match="fraction"):
        sample_size(10, fraction, 1)


def test_same_seed_and_round_same_sample_and_rounds_differ():
    ids = range(100)
    a = [sample_clients(ids, 0.1, 1, seed=7, round_num=r) for r in range(1, 6)]
    b = [sample_clients(list(reversed(ids)), 0.1, 1, seed=7, round_num=r) for r in range(1, 6)]
    assert a == b  # order of connection does not matter
    assert all(len(s) == 10 and s == sorted(s) and len(set(s)) == 10 for s in a)
    assert len({tuple(s) for s in a}) == 5
    assert sample_clients(ids, 0.1, 1, seed=8, round_num=1) != a[0]
    assert sample_clients(ids, 0.1, 1, seed=7, round_num=1, attempt=1) != a[0]


def test_every_client_is_sampled_about_equally_often():
    counts = [0] * 20
    for r in range(1, 2001):
        for cid in sample_clients(range(20), 0.25, 1, seed=0, round_num=r):
            counts[cid] += 1
    assert all(400 < c < 600 for c in counts)  # expected 500 each


def test_full_fraction_is_everyone():
    assert sample_clients([5, 3, 9], 1.0, 1, seed=0, round_num=1) == [3, 5, 9]
