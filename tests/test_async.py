"""Buffered asynchronous aggregation (FedBuff): the buffer's arithmetic against hand-computed
values, the schedule without sockets, and real server and client processes."""
from __future__ import annotations

import math

import pytest

from fl.server.config import ServerConfig
from fl.strategies.staleness import Buffer, Stale, staleness_factor

# --- the arithmetic --------------------------------------------------------------------------


def test_polynomial_factor_is_one_over_sqrt_of_one_plus_staleness():
    # s = 0: 1; s = 3: 1/sqrt(4) = 0.5; s = 8: 1/sqrt(9) = 1/3; s = 99: 1/10
    assert staleness_factor(0) == 1.0
    assert staleness_factor(3) == 0.5
    assert staleness_factor(8) == pytest.approx(1 / 3)
    assert staleness_factor(99) == pytest.approx(0.1)
    assert staleness_factor(99, "constant") == 1.0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            staleness_factor(bad)
    with pytest.raises(ValueError, match="staleness rule"):
        staleness_factor(0, "linear")


def test_buffer_weights_are_samples_times_factor():
    buf = Buffer(size=3, version=5, rule="polynomial", weighting="samples")
    fresh = buf.admit(client_id=1, trained_from=5, samples=600)  # staleness 0: 600 x 1
    buf.add(fresh)
    stale = buf.admit(client_id=2, trained_from=2, samples=600)  # staleness 3: 600 x 1/2 = 300
    buf.add(stale)
    assert (fresh.staleness, fresh.factor, fresh.weight) == (0, 1.0, 600.0)
    assert (stale.staleness, stale.factor, stale.weight) == (3, 0.5, 300.0)
    uniform = Buffer(size=2, version=8, weighting="uniform").admit(7, 0, samples=600)  # s = 8: 1/3
    assert uniform.weight == pytest.approx(1 / 3)
    assert buf.clients == [1, 2] and buf.staleness == [0, 3] and not buf.full
    buf.add(buf.admit(3, 4, 10))
    assert buf.full
    with pytest.raises(ValueError, match="already holds"):
        buf.admit(4, 5, 10)


def test_buffer_refuses_stale_repeated_and_future_updates():
    buf = Buffer(size=4, version=10, max_staleness=2)
    buf.add(buf.admit(1, 8, 100))  # staleness 2: at the limit, taken
    with pytest.raises(Stale, match="staleness 3 .*exceeds --max-staleness 2"):
        buf.admit(2, 7, 100)
    with pytest.raises(ValueError, match="already has an update"):
        buf.admit(1, 10, 100)
    with pytest.raises(ValueError, match="newer than"):
        buf.admit(3, 11, 100)
    assert buf.clients == [1]


@pytest.mark.parametrize("settings, message", [
    (dict(mode="fast"), "--mode must be one of"),
    (dict(mode="async", concurrency=0, min_clients=3, buffer_size=2), "--concurrency and --buffer-size"),
    (dict(mode="async", min_clients=3, buffer_size=4), "--buffer-size 4 needs --min-clients >= 4"),
    (dict(mode="async", min_clients=3, buffer_size=2, fraction=0.5), "--fraction samples a synchronous round"),
    (dict(mode="async", min_clients=3, buffer_size=2, secure_aggregation=True), "cannot use --secure-aggregation"),
    (dict(mode="async", min_clients=3, buffer_size=2, dp_noise_multiplier=1.0, clip_norm=1.0),
     "--staleness-weight polynomial has no effect under DP"),
    (dict(mode="async", min_clients=3, buffer_size=2, strategy="median"), "no effect under median"),
    (dict(mode="async", min_clients=3, buffer_size=2, max_staleness=-1), "--max-staleness must be >= 0"),
])
def test_config_refuses_what_async_cannot_do(settings, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**settings)


def test_config_accepts_async_settings():
    cfg = ServerConfig(mode="async", min_clients=4, buffer_size=3, concurrency=4, max_staleness=5)
    assert cfg.asynchronous and cfg.async_problem() is None
    assert not ServerConfig().asynchronous and math.isfinite(ServerConfig().round_timeout)
