"""Straggling clients: ``--speed`` (a client's slowdown, slept after training, not under the
host's lock) and the launcher's ``--client-speeds`` (per-client factors, seeded, recorded)."""
from __future__ import annotations

import dataclasses
import json
import re
import socket

import pytest
import torch
from procs import Worker, client_args, expect_exit, log_of, run, server_args, start, stop

from fl.client import local
from fl.client.config import ClientConfig
from fl.client.host import Host
from fl.client.participant import Participant
from fl.learning.config import TrainingConfig
from fl.learning.model import ImprovedCNN
from fl.wire.frames import Connection, MsgType


@pytest.mark.parametrize("speed, trained, expected", [(1.0, 3.0, 0.0), (3.0, 2.0, 4.0), (1.5, 0.5, 0.25)])
def test_a_client_sleeps_speed_minus_one_times_its_training_time(speed, trained, expected):
    assert local.straggle_seconds(speed, trained) == pytest.approx(expected)


class FixedTimeHost(Host):
    """A real host whose training reports ``seconds``, so the sleep it causes is exact."""

    seconds = 2.0

    def fit(self, client, round_num, config, base, attempt=0):
        state, result, generator, n = super().fit(client, round_num, config, base, attempt)
        return state, dataclasses.replace(result, seconds=self.seconds), generator, n


def participant(speed: float) -> tuple[Participant, FixedTimeHost]:
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    host = FixedTimeHost(images, torch.arange(8) % 10, torch.device("cpu"))
    return Participant(0, host, dataclasses.replace(ClientConfig(), speed=speed, progress=False)), host


def send_model(server: Connection) -> None:
    config = TrainingConfig(epochs=1, lr=0.01, batch_size=4, augment=False).to_wire()
    server.send(MsgType.MODEL, {"round": 1, "rounds": 1, "config": config, "state": ImprovedCNN().state_dict(),
                                "view_id": 1}, timeout=30)


def serve_one_round(speed: float) -> tuple[list[tuple[float, bool]], dict]:
    """A participant with ``speed`` serves one real MODEL over a socket pair; the sleeps it
    asked for, each with whether the host's lock was free meanwhile, and its UPDATE."""
    client, host = participant(speed)
    sleeps = []

    def wait(conn: Connection, seconds: float) -> bool:
        free = host.lock.acquire(blocking=False)  # another client of this host could train now
        if free:
            host.lock.release()
        if seconds > 0:
            sleeps.append((seconds, free))
        return False  # the server said nothing meanwhile

    client.wait = wait
    a, b = socket.socketpair()
    with a, b:
        server = Connection(a)
        served = Worker(client.serve, Connection(b))
        send_model(server)
        update = server.recv(MsgType.UPDATE, timeout=60)
        server.send(MsgType.DONE, {"reason": "finished"}, timeout=10)
        assert served.get(timeout=60) == "finished"
    return sleeps, update.body


def test_a_slow_client_sleeps_after_training_without_holding_the_hosts_lock():
    sleeps, update = serve_one_round(speed=3.0)
    assert sleeps == [(pytest.approx(4.0), True)]  # (3 - 1) x 2 s, the lock free for the host's others
    assert update["round"] == 1


def test_a_client_at_full_speed_never_sleeps():
    sleeps, _ = serve_one_round(speed=1.0)
    assert sleeps == []


@pytest.mark.parametrize("speed", [1.0, 1000.0])
def test_a_client_told_done_while_it_trains_does_not_send_its_update(speed, caplog):
    """The federation ended while it trained (an asynchronous run's last step): the real wait
    sees the server's DONE (a straggler's 1,998 s sleep ends at once) and nothing is sent."""
    client, _ = participant(speed)
    a, b = socket.socketpair()
    with a, b:
        server = Connection(a)
        served = Worker(client.serve, Connection(b))
        send_model(server)
        server.send(MsgType.DONE, {"reason": "federation complete"}, timeout=10)
        with caplog.at_level("INFO"):
            assert served.get(timeout=60) == "federation complete"
        a.settimeout(0.5)
        with pytest.raises(socket.timeout):  # not a byte of an UPDATE
            a.recv(1)
    assert client.rounds_trained == 0
    assert "round 1: trained, but the federation ended meanwhile: update not sent" in caplog.text


def test_a_real_client_with_speed_3_sleeps_twice_its_training_time(tmp_path, synthetic_mnist_dir, free_port):
    """Smoke run: server and two client.py processes, one with --speed 3, one round."""
    server = start("server.py", *server_args(free_port, tmp_path, synthetic_mnist_dir, 1, 2, "--test-limit", 100),
                   log=tmp_path / "server.log")
    clients = [start("client.py", *client_args(free_port, i, 2, synthetic_mnist_dir, "--limit", 64,
                                               *(["--speed", 3] if i == 0 else [])), log=tmp_path / f"c{i}.log")
               for i in range(2)]
    try:
        expect_exit(server, tmp_path / "server.log")
        for i, c in enumerate(clients):
            expect_exit(c, tmp_path / f"c{i}.log", timeout=30)
    finally:
        stop(server, *clients)
    slow = re.search(r"round 1: .*\| ([\d.]+) s, .* after sleeping ([\d.]+) s \(--speed 3\)", log_of(tmp_path / "c0.log"))
    assert slow, log_of(tmp_path / "c0.log")
    assert float(slow[2]) == pytest.approx(2 * float(slow[1]), abs=0.1)  # the log rounds training to 0.1 s
    assert "sleeping" not in log_of(tmp_path / "c1.log")


@pytest.mark.parametrize("speed", ["0.5", "nan", "inf"])
def test_a_speed_below_one_is_one_line_and_exit_2(speed):
    r = run("client.py", "--speed", speed)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith(f"--speed must be a finite factor >= 1, got {float(speed)}")


def test_a_worker_gives_each_hosted_client_the_speed_its_file_names(tmp_path, synthetic_mnist_dir):
    from worker import build, parse_args

    speeds = tmp_path / "speeds.json"
    speeds.write_text(json.dumps({"speeds": {"1": 2.5, "7": 4}}))
    args = parse_args(["--client-ids", "0-2", "--num-clients", "8", "--speeds", str(speeds), "--speed", "1.5",
                       "--data-dir", str(synthetic_mnist_dir), "--no-download"])
    worker = build(args)
    assert [p.config.speed for p in worker.participants] == [1.5, 2.5, 1.5]


@pytest.mark.parametrize("content, why", [
    ("not json", "not a speeds file"),
    ('{"speeds": [1, 2]}', "not a speeds file"),
    ('{"speeds": {"0": 0.5}}', "client 0: a factor must be a finite number >= 1, got 0.5"),
    ('{"speeds": {"-1": 2}}', "client -1: a factor must be"),
])
def test_a_bad_speeds_file_is_one_line_and_exit_2(tmp_path, content, why):
    speeds = tmp_path / "speeds.json"
    speeds.write_text(content)
    r = run("worker.py", "--client-ids", "0", "--num-clients", "2", "--speeds", speeds)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and why in errors[0], r.stderr  # argparse's usage, then one error line


# --- the launcher: --client-speeds ----------------------------------------------------------

def test_lognormal_speeds_are_seeded_per_client_and_at_least_one():
    import simulate

    speeds = simulate.client_speeds("lognormal:1", 100, seed=0)
    assert speeds == simulate.client_speeds("lognormal:1.0", 100, seed=0)  # the same run, the same factors
    assert speeds[:10] == simulate.client_speeds("lognormal:1", 10, seed=0)  # a client's own draw
    assert speeds != simulate.client_speeds("lognormal:1", 100, seed=1)
    assert min(speeds) == 1.0 and 20 < speeds.count(1.0) < 80 and max(speeds) > 3  # the faster half at 1
    # sigma scales the same draws: exp(2z) = exp(z)^2 where exp(z) > 1
    assert simulate.client_speeds("lognormal:2", 100, seed=0) == pytest.approx([f * f for f in speeds])
    assert simulate.client_speeds("lognormal:0", 5, seed=0) == [1.0] * 5
    # MEDIAN scales every draw before the floor at 1: the same z, ten times the factor
    z_free = [f for f in speeds if f > 1.0]
    scaled = simulate.client_speeds("lognormal:1:10", 100, seed=0)
    assert [s for s, f in zip(scaled, speeds) if f > 1.0] == pytest.approx([10 * f for f in z_free])
    assert min(scaled) >= 1.0 and sorted(scaled)[50] > 5.0  # the median device is slower than this machine


@pytest.mark.parametrize("text, expected", [
    ("1\n2.5\n# a comment\n\n4\n", [1.0, 2.5, 4.0]),
    ("2 3.5  # the slow one\n0 1.5\n", [1.5, 1.0, 3.5]),
])
def test_a_speeds_file_names_factors_by_line_or_by_client_id(text, expected):
    import simulate

    assert simulate.parse_speeds(text, 3) == expected


@pytest.mark.parametrize("text, error", [
    ("1\n2\n", "2 factors for 3 clients"),
    ("0 2\n1\n", "expected one factor per line, or 'CLIENT_ID FACTOR' on every line"),
    ("3 2\n", "line 1: client 3 is out of range for --clients 3"),
    ("1\nfast\n1\n", "line 2: 'fast' is not a number"),
    ("x 2\n", "line 1: 'x' is not an integer"),
    ("1\n0.5\n1\n", "line 2: a factor must be a finite number >= 1, got 0.5"),
    ("", "expected one factor per line"),
])
def test_a_bad_speeds_file_says_which_line(text, error):
    import simulate

    with pytest.raises(ValueError, match=re.escape(error)):
        simulate.parse_speeds(text, 3)


@pytest.mark.parametrize("spec, error", [
    ("lognormal:-1", "expected lognormal:SIGMA[:MEDIAN] with a finite SIGMA >= 0, got lognormal:-1"),
    ("lognormal:wide", "expected lognormal:SIGMA or lognormal:SIGMA:MEDIAN"),
    ("lognormal:1:0.5", "MEDIAN must be a finite number >= 1, got 0.5"),
    ("lognormal:1:2:3", "expected lognormal:SIGMA[:MEDIAN] with a finite SIGMA >= 0, got lognormal:1:2:3"),
    ("/nowhere/speeds.txt", "neither lognormal:SIGMA nor a readable file"),
])
def test_a_bad_client_speeds_spec_is_one_line_and_exit_2(spec, error):
    r = run("simulate.py", "--client-speeds", spec)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"--client-speeds {spec}: {error}" in errors[0], r.stderr


def test_the_launcher_records_the_speeds_and_the_workers_sleep_by_them(tmp_path, synthetic_mnist_dir):
    import simulate

    out = tmp_path / "run"
    r = run("simulate.py", "--clients", 3, "--rounds", 1, "--limit", 20, "--test-limit", 100, "--seed", 0,
            "--client-speeds", "lognormal:1", "--data-dir", synthetic_mnist_dir, "--out", out, "--no-plot",
            timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = simulate.client_speeds("lognormal:1", 3, 0)
    assert expected[1] > 1 and expected[0] == expected[2] == 1  # seed 0: client 1 is the straggler
    record = json.loads((out / "speeds.json").read_text())
    assert record == {"client_speeds": "lognormal:1", "seed": 0, "speeds": {"0": 1.0, "1": expected[1], "2": 1.0}}
    logs = [(out / f"worker-{i}.log").read_text() for i in range(3)]  # a worker per client here
    assert [("after sleeping" in log) for log in logs] == [False, True, False], logs
    assert f"(--speed {expected[1]:g})" in logs[1]
