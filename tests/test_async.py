"""Buffered asynchronous aggregation (FedBuff): the buffer's arithmetic against hand-computed
values, the schedule without sockets, and real server and client processes."""
from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import pytest
from procs import client_args, expect_exit, log_of, server_args, start, stop

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


# --- real processes: three clients and one 20x slower -----------------------------------------

SLOW = 3  # the straggler's id


def metrics(tmp: Path) -> list[dict]:
    path = tmp / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def start_federation(tmp: Path, port: int, data: Path, rounds: int, *extra: object) -> list:
    """An async server (4 clients all training at once, buffers of 2) and clients 0-2 at full
    speed, client 3 at --speed 20; the server first."""
    server = start("server.py", *server_args(port, tmp, data, rounds, 4, "--mode", "async", "--concurrency", 4,
                                             "--buffer-size", 2, "--test-limit", 200, "--round-timeout", 60, *extra),
                   log=tmp / "server.log")
    clients = [start("client.py", *client_args(port, i, 4, data, "--limit", 100,
                                                *(["--speed", 20] if i == SLOW else [])), log=tmp / f"c{i}.log")
               for i in range(4)]
    return [server, *clients]


def wait_for(condition, tmp: Path, server, timeout: float = 240.0):
    """Poll the metrics until ``condition(records)`` holds (the timeout only guards a hang)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        records = metrics(tmp)
        if condition(records):
            return records
        assert server.poll() is None, log_of(tmp / "server.log")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"condition not met: {metrics(tmp)[-3:]}\n{log_of(tmp / 'server.log')[-3000:]}")


def slow_update(records: list[dict]) -> tuple[dict, dict] | None:
    """The first step that folded the straggler's update, and its entry there."""
    for r in records:
        for c in r["per_client"]:
            if c["client_id"] == SLOW:
                return r, c
    return None


def test_steps_go_on_while_a_slow_client_trains_and_its_update_is_down_weighted(tmp_path, mnist_dir, free_port):
    procs = start_federation(tmp_path, free_port, mnist_dir, 100)
    server = procs[0]
    try:
        records = wait_for(lambda m: (found := slow_update(m)) is not None and len(m) >= found[0]["round"] + 1,
                           tmp_path, server)
        server.send_signal(signal.SIGTERM)  # stop after the step under way: checkpoint and exit 0
        expect_exit(server, tmp_path / "server.log", timeout=90)
    finally:
        stop(*procs)
    step, entry = slow_update(records)
    s = entry["staleness"]
    # Trained from version 0 (all four sent the first model at once); s steps were published meanwhile.
    assert entry["version"] == 0 and s == step["round"] - 1 and s >= 1
    assert [r["round"] for r in records[:s]] == list(range(1, s + 1))
    assert all(SLOW not in r["buffer"] for r in records[:s])  # those steps came from the fast clients
    assert entry["factor"] == pytest.approx((1 + s) ** -0.5)
    assert entry["weight"] == pytest.approx(entry["samples"] * (1 + s) ** -0.5)
    assert step["staleness"][step["buffer"].index(SLOW)] == s and step["version"] == step["round"]
    assert all(r["version"] == r["round"] and len(r["buffer"]) == 2 for r in records)
    assert all(c["weight"] == pytest.approx(c["samples"] * (1 + c["staleness"]) ** -0.5)
               for r in records for c in r["per_client"])

    # A resumed run continues from the checkpoint's version, its dispatches numbered after the last.
    last = metrics(tmp_path)[-1]["round"]
    procs = start_federation(tmp_path, free_port, mnist_dir, last + 2, "--resume")
    try:
        expect_exit(procs[0], tmp_path / "server.log", timeout=180)
    finally:
        stop(*procs)
    resumed = metrics(tmp_path)
    assert [r["round"] for r in resumed] == list(range(1, last + 3))
    assert [r["version"] for r in resumed[last:]] == [last + 1, last + 2]
    assert all(c["version"] >= last for r in resumed[last:] for c in r["per_client"])
    assert f"resumed from {tmp_path / 'ckpt.pt'} after round {last}" in log_of(tmp_path / "server.log")


def test_an_update_past_max_staleness_is_refused_with_one_line(tmp_path, mnist_dir, free_port):
    procs = start_federation(tmp_path, free_port, mnist_dir, 100, "--max-staleness", 3)
    server = procs[0]
    refused = f"rejected update from client {SLOW}: staleness "
    try:
        wait_for(lambda m: any(SLOW in [x["client_id"] for x in r["rejected"]] for r in m), tmp_path, server)
        server.send_signal(signal.SIGTERM)
        expect_exit(server, tmp_path / "server.log", timeout=90)
    finally:
        stop(*procs)
    text = log_of(tmp_path / "server.log")
    lines = [line for line in text.splitlines() if "rejected update" in line]
    assert any(refused in line for line in lines), text[-3000:]
    assert all("exceeds --max-staleness 3" in line for line in lines)
    records = metrics(tmp_path)
    assert all(c["staleness"] <= 3 for r in records for c in r["per_client"])
    reasons = [x["reason"] for r in records for x in r["rejected"] if x["client_id"] == SLOW]
    assert reasons and all("exceeds --max-staleness 3" in x for x in reasons)
