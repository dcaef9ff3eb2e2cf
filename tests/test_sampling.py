"""sampling.py: the size rule, determinism per (seed, round), spread over rounds, and the
secret draw under DP."""
from __future__ import annotations

import pytest

import server
from fl.server import app
from fl.server.federation import Federation, Session
from fl.server.sampling import sample_clients, sample_size
from fl.wire.handshake import Peer


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


def test_seeded_sampling_is_unchanged():
    """Outside DP the sample stays the seeded pure function it was (these are its draws)."""
    assert sample_clients(range(100), 0.1, 1, seed=7, round_num=1) == [8, 33, 39, 55, 61, 62, 75, 82, 91, 95]
    assert sample_clients(range(1000), 0.01, 1, seed=0, round_num=3, attempt=1) == \
        [32, 378, 497, 505, 511, 590, 598, 858, 862, 888]
    assert sample_clients(range(20), 0.25, 1, seed=0, round_num=2) == [4, 5, 10, 14, 17]


def test_secret_sampling_is_not_a_function_of_its_arguments():
    """seed=None (DP): the OS CSPRNG. Two draws of 10 of 1000 coincide with probability
    1 / C(1000, 10) ~ 4e-24, so equal draws would mean a fixed seed somewhere."""
    draws = {tuple(sample_clients(range(1000), 0.01, 1, seed=None, round_num=1)) for _ in range(3)}
    assert len(draws) == 3 and all(len(d) == 10 and list(d) == sorted(set(d)) for d in draws)
    assert sample_clients([5, 3, 9], 1.0, 1, seed=None, round_num=1) == [3, 5, 9]


def test_secret_sampling_is_uniform():
    counts = [0] * 20
    for _ in range(2000):
        for cid in sample_clients(range(20), 0.25, 1, seed=None, round_num=1):
            counts[cid] += 1
    assert all(380 < c < 620 for c in counts)  # expected 500 each, sd 19.4: six sd either side


def open_rounds(argv: list[str], clients: int = 100) -> list[int]:
    """The clients a fresh server (these flags, seed 0) samples for round 1."""
    config, _ = server.parse_args(["--min-clients", str(clients), "--fraction", "0.1", "--seed", "0", *argv])
    fed = Federation(config, app.build_strategy(config))
    connected = {cid: Session(Peer(cid, 100, {}), f"t:{cid}") for cid in range(clients)}
    fed.sessions.update(connected)
    rnd, _ = fed.open_round(1, 0, connected)
    return sorted(rnd.participants)


def test_two_dp_servers_with_the_same_seed_sample_differently_and_two_plain_ones_alike():
    dp = ["--dp-noise-multiplier", "1", "--clip-norm", "1", "--dp-seed", "0"]
    first, second = open_rounds(dp), open_rounds(dp)
    assert len(first) == len(second) == 10 and first != second  # equal with probability 1 / C(100, 10) ~ 6e-14
    plain = open_rounds([])
    assert plain == open_rounds([]) == sample_clients(range(100), 0.1, 1, seed=0, round_num=1)
