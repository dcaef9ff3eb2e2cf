"""End to end with real processes: client sampling, and a resumed fedadam run that continues
exactly like an uninterrupted one (moments restored from the checkpoint)."""
from __future__ import annotations

import json
import re
import signal
import socket

import torch
from procs import server_args, start, stop, wait_for_line

from fl.server import checkpoint as ckpt


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(port, tmp, data, n, name, *extra):
    return start("worker.py", "--client-ids", f"0-{n - 1}", "--num-clients", n, "--port", port, "--limit", 60,
                 "--data-dir", data, "--no-download", "--no-progress", *extra, log=tmp / f"{name}.log")


def federation(tmp, data, rounds, clients, *server_extra):
    port = free_port()
    server = start("server.py", *server_args(port, tmp, data, rounds, clients, "--test-limit", 100, *server_extra),
                   log=tmp / "server.log")
    hosted = worker(port, tmp, data, clients, "worker")
    try:
        assert server.wait(timeout=180) == 0, (tmp / "server.log").read_text()[-3000:]
        assert hosted.wait(timeout=30) == 0, (tmp / "worker.log").read_text()[-3000:]
    finally:
        stop(server, hosted)
    return read_metrics(tmp / "metrics.jsonl")


def test_fraction_samples_the_same_clients_for_the_same_seed(tmp_path, synthetic_mnist_dir):
    runs = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        metrics = federation(tmp_path / str(i), synthetic_mnist_dir, 3, 6, "--fraction", "0.5", "--seed", "4")
        assert [len(m["sampled"]) for m in metrics] == [3, 3, 3]
        assert all(sorted(c["client_id"] for c in m["per_client"]) == m["sampled"] for m in metrics)
        assert all(m["connected"] == 6 and m["participants"] == 3 for m in metrics)
        trained = re.findall(r"client (\d+): round (\d+):", (tmp_path / str(i) / "worker.log").read_text())
        assert len(trained) == 9  # only the sampled clients were sent a model and trained
        runs.append(([m["sampled"] for m in metrics], [m["accuracy"] for m in metrics]))
    assert runs[0] == runs[1]  # the same clients, and the same accuracy every round
    assert len({tuple(s) for s in runs[0][0]}) > 1  # and the sample changes from round to round


def test_fedadam_killed_after_round_2_resumes_with_its_moments(tmp_path, synthetic_mnist_dir):
    strategy = ("--strategy", "fedadam", "--server-lr", "0.01", "--tau", "0.001")
    straight = tmp_path / "straight"
    straight.mkdir()
    federation(straight, synthetic_mnist_dir, 4, 2, *strategy)

    killed = tmp_path / "killed"
    killed.mkdir()
    port = free_port()
    args = server_args(port, killed, synthetic_mnist_dir, 4, 2, "--test-limit", 100, *strategy)
    server = start("server.py", *args, log=killed / "server.log")
    hosted = worker(port, killed, synthetic_mnist_dir, 2, "worker", "--connect-timeout", 60)
    resumed = None
    try:
        wait_for_line(killed / "server.log", "round 2/4", timeout=120, proc=server)
        server.send_signal(signal.SIGKILL)
        server.wait()
        resumed = start("server.py", *args, "--resume", log=killed / "server2.log")
        assert resumed.wait(timeout=180) == 0, (killed / "server2.log").read_text()[-3000:]
        assert hosted.wait(timeout=30) == 0, (killed / "worker.log").read_text()[-3000:]
    finally:
        stop(server, hosted, *([resumed] if resumed else []))
    log = (killed / "server2.log").read_text()
    assert re.search(r"resumed from .* after round [23]", log), log[-2000:]
    a, b = ckpt.load(straight / "ckpt.pt"), ckpt.load(killed / "ckpt.pt")
    assert a["round"] == b["round"] == 4 and a["strategy"]["step"] == b["strategy"]["step"] == 4
    for key in ("m", "v"):
        assert torch.allclose(a["strategy"][key], b["strategy"][key], rtol=1e-6, atol=1e-12), key
    for k, v in a["model"].items():
        assert torch.allclose(b["model"][k].double(), v.double(), rtol=1e-5, atol=1e-7), k
    assert [m["round"] for m in read_metrics(killed / "metrics.jsonl")] == [1, 2, 3, 4]
