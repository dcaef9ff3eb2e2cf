from __future__ import annotations

import itertools
import os
import random

import pytest

from fl.secagg.shamir import reconstruct, share


@pytest.mark.parametrize("size", [16, 32, 48])
def test_any_t_of_n_shares_reconstruct(size: int) -> None:
    secret = os.urandom(size)
    shares = share(secret, 3, 5)
    assert [x for x, _ in shares] == [1, 2, 3, 4, 5]
    assert all(len(y) == size for _, y in shares)
    for subset in itertools.combinations(shares, 3):
        assert reconstruct(list(subset), 3) == secret
    for subset in itertools.combinations(shares, 4):  # more than t, any order
        assert reconstruct(list(reversed(subset)), 3) == secret


def test_random_subsets_of_a_larger_group() -> None:
    rng = random.Random(0)
    secret = os.urandom(32)
    shares = share(secret, 6, 10)
    for _ in range(10):
        assert reconstruct(rng.sample(shares, 6), 6) == secret


def test_fewer_than_t_shares_are_refused_and_interpolate_to_garbage() -> None:
    secret = os.urandom(32)
    shares = share(secret, 4, 7)
    with pytest.raises(ValueError, match="3 shares cannot reconstruct"):
        reconstruct(shares[:3], 4)
    # Interpolating t-1 shares (as if the threshold were t-1) yields some other value.
    for subset in itertools.combinations(shares, 3):
        assert reconstruct(list(subset), 3) != secret


def test_shares_are_fresh_each_time() -> None:
    secret = os.urandom(32)
    assert share(secret, 3, 5)[0] != share(secret, 3, 5)[0]


@pytest.mark.parametrize(
    "secret, t, n",
    [(b"", 2, 3), (b"x" * 15, 2, 3), ("s" * 16, 2, 3), (b"x" * 16, 0, 3), (b"x" * 16, 4, 3), (b"x" * 16, 2, 1 << 17)],
)
def test_share_refuses_bad_arguments(secret: object, t: int, n: int) -> None:
    with pytest.raises(ValueError):
        share(secret, t, n)  # type: ignore[arg-type]


def test_reconstruct_refuses_malformed_shares() -> None:
    shares = share(os.urandom(32), 2, 3)
    with pytest.raises(ValueError, match="same index"):
        reconstruct([shares[0], shares[0]], 2)
    with pytest.raises(ValueError, match="same non-empty multiple"):
        reconstruct([shares[0], (2, shares[1][1][:16])], 2)
    with pytest.raises(ValueError, match="indices"):
        reconstruct([shares[0], (0, shares[1][1])], 2)
    with pytest.raises(ValueError, match="tuple"):
        reconstruct([shares[0], [2, shares[1][1]]], 2)  # type: ignore[list-item]
