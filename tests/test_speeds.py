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


def serve_one_round(speed: float) -> tuple[list[tuple[float, bool]], dict]:
    """A participant with ``speed`` serves one real MODEL over a socket pair; the sleeps it
    asked for, each with whether the host's lock was free meanwhile, and its UPDATE."""
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    host = FixedTimeHost(images, torch.arange(8) % 10, torch.device("cpu"))
    client = Participant(0, host, dataclasses.replace(ClientConfig(), speed=speed, progress=False))
    sleeps = []

    def sleep(seconds: float) -> None:
        free = host.lock.acquire(blocking=False)  # another client of this host could train now
        if free:
            host.lock.release()
        sleeps.append((seconds, free))

    client.sleep = sleep
    a, b = socket.socketpair()
    with a, b:
        server = Connection(a)
        served = Worker(client.serve, Connection(b))
        config = TrainingConfig(epochs=1, lr=0.01, batch_size=4, augment=False).to_wire()
        server.send(MsgType.MODEL, {"round": 1, "rounds": 1, "config": config, "state": ImprovedCNN().state_dict(),
                                    "view_id": 1}, timeout=30)
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
