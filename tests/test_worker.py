"""Virtual clients: participant.py (the per-connection logic client.py and worker.py
share) in-process against a scripted server, and worker.py as a real process against
the real server.py on 127.0.0.1."""
from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import make_synthetic_images
from procs import Worker as Thread
from procs import server_args, start, stop

from fl.client import local, participant
from fl.client.config import ClientConfig
from fl.client.host import Host
from fl.common.ids import format_ids, parse_ids
from fl.common.layout import Layout
from fl.learning.model import ImprovedCNN
from fl.wire.frames import Connection, MsgType
from worker import parse_args

CONFIG = {"epochs": 1, "lr": 1e-3, "batch_size": 16, "augment": True, "hflip": False}


# --- the worker's command line -----------------------------------------------------------

def test_parse_and_format_ids():
    assert parse_ids("0-3,7,5-5, 9") == [0, 1, 2, 3, 5, 7, 9]
    for bad in ("", "a", "3-", "-1", "4-2", "1-2-3"):
        with pytest.raises(ValueError):
            parse_ids(bad)
    assert format_ids([0, 1, 2, 3, 5, 7, 8]) == "0-3,5,7-8"
    assert parse_ids(format_ids(list(range(0, 100, 3)))) == list(range(0, 100, 3))


def test_worker_args(capsys):
    args = parse_args(["--client-ids", "0-49", "--num-clients", "100", "--quantize-ids", "3,4"])
    assert args.client_ids == list(range(50)) and args.quantize_ids == {3, 4}
    assert args.threads == 1 and args.device == "cpu"  # one torch thread per worker by default
    for argv, msg in ((["--client-ids", "98-100", "--num-clients", "100"], "valid: 0..99"),
                      (["--client-ids", "x", "--num-clients", "3"], "bad client id range"),
                      (["--num-clients", "3"], "--client-ids")):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2 and msg in capsys.readouterr().err


# --- participants against a scripted server over a socket pair --------------------------------

def small_data(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % 10
    return make_synthetic_images(labels, seed), labels


def scripted_server(conn: Connection, rounds: list[dict]) -> list[dict]:
    """Send each MODEL body, collect the UPDATE bodies, then DONE."""
    updates = []
    for body in rounds:
        conn.send(MsgType.MODEL, body)
        updates.append(conn.recv(MsgType.UPDATE, timeout=60).body)
    conn.send(MsgType.DONE, {"reason": "test over"})
    return updates


def serve_one(p: participant.Participant, rounds: list[dict]) -> tuple[list[dict], str]:
    a, b = socket.socketpair()
    server = Thread(scripted_server, Connection(a), rounds)
    try:
        reason = p.serve(Connection(b))
        return server.get(timeout=60), reason
    finally:
        a.close()
        b.close()


def model_msg(round_num: int, state: dict, view_id: int, **config) -> dict:
    return {"round": round_num, "rounds": 3, "config": {**CONFIG, **config}, "state": state, "view_id": view_id}


def test_virtual_client_trains_exactly_like_a_client_process():
    """Client 2 hosted among others in a worker (indices into the whole set, a shared model
    that another client trained first) sends the same update, bit for bit, as client 2 alone
    in its own process (its shard gathered, a model of its own)."""
    images, labels = small_data()
    idx = {cid: torch.arange(cid, 48, 3) for cid in range(3)}
    cfg = ClientConfig(seed=5, progress=False)
    state = {k: v.clone() for k, v in ImprovedCNN().state_dict().items()}

    shared = Host(images, labels, torch.device("cpu"))
    first = participant.Participant(0, shared, cfg, indices=idx[0])
    serve_one(first, [model_msg(1, state, 1)])  # leaves the shared model trained and the RNGs used
    hosted = participant.Participant(2, shared, cfg, indices=idx[2])
    (got,), reason = serve_one(hosted, [model_msg(1, state, 1)])

    alone = participant.Participant(2, Host(images[idx[2]], labels[idx[2]], torch.device("cpu")), cfg)
    (want,), _ = serve_one(alone, [model_msg(1, state, 1)])
    assert reason == "test over" and got["num_samples"] == want["num_samples"] == 16
    assert torch.equal(got["flat"]["float"], want["flat"]["float"])
    assert got["flat"]["int"] == want["flat"]["int"]
    assert not torch.equal(got["flat"]["float"], Layout.of(state).pack(state)["float"])  # it did train


def test_participants_of_a_host_share_one_received_model():
    images, labels = small_data()
    host = Host(images, labels, torch.device("cpu"))
    cfg = ClientConfig(progress=False)
    state = ImprovedCNN().state_dict()
    ps = [participant.Participant(cid, host, cfg, indices=torch.arange(cid, 48, 2)) for cid in range(2)]
    for p in ps:  # each decodes its own copy from its own connection...
        serve_one(p, [model_msg(1, {k: v.clone() for k, v in state.items()}, 7)])
    assert ps[0].view is ps[1].view  # ...and keeps the one already held
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    serve_one(ps[1], [model_msg(1, other, 7)])  # same view id, other tensors (a restarted server)
    assert ps[1].view is not ps[0].view


def test_quantized_participant_and_8bit_broadcast():
    images, labels = small_data()
    host = Host(images, labels, torch.device("cpu"))
    p = participant.Participant(1, host, ClientConfig(quantization=True, progress=False),
                                indices=torch.arange(24))
    state = ImprovedCNN().state_dict()
    from fl.learning.quantization import quantize_state, state_delta

    moved = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    delta = {"round": 2, "rounds": 3, "config": CONFIG, "delta": quantize_state(state_delta(moved, state)),
             "base_view": 1, "view_id": 2}
    updates, _ = serve_one(p, [model_msg(1, state, 1), delta])
    assert [u["quantized"] for u in updates] == [True, True] and all("delta" in u for u in updates)
    assert p.view_id == 2


@pytest.mark.parametrize("config,expected", [({}, 0.0), ({"mu": 0.0}, 0.0), ({"mu": 0.01}, 0.01)])
def test_fedprox_mu_from_the_round_config_reaches_train(monkeypatch, config, expected):
    seen = {}
    real_train = local.train

    def spy(model, images, labels, config, **kwargs):
        seen["mu"] = config.proximal_mu
        return real_train(model, images, labels, config, **kwargs)

    monkeypatch.setattr(local, "train", spy)
    images, labels = small_data(16)
    p = participant.Participant(0, Host(images, labels, torch.device("cpu")),
                                ClientConfig(progress=False))
    serve_one(p, [model_msg(1, ImprovedCNN().state_dict(), 1, **config)])
    assert seen["mu"] == expected


# --- worker.py against the real server.py ------------------------------------------------------

def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_worker_hosts_six_authenticated_clients(tmp_path, synthetic_mnist_dir, free_port):
    """One worker process, six virtual clients (two quantized), each its own authenticated
    connection: the server sees six distinct clients in each of two rounds."""
    secret = {"FL_SECRET": "virtual-clients-test"}
    server = start("server.py", *server_args(free_port, tmp_path, synthetic_mnist_dir, 2, 6, "--test-limit", 100),
                   log=tmp_path / "server.log", **secret)
    worker = start("worker.py", "--client-ids", "0-5", "--num-clients", 6, "--port", free_port,
                   "--quantize-ids", "1,4", "--limit", 40, "--data-dir", synthetic_mnist_dir, "--no-download",
                   "--no-progress", log=tmp_path / "worker.log", **secret)
    try:
        assert server.wait(timeout=180) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        stop(server, worker)
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert sorted(c["client_id"] for c in m["per_client"]) == list(range(6))
        assert m["quantized"] == 2 and {c["client_id"] for c in m["per_client"] if c["quantized"]} == {1, 4}
        assert {c["samples"] for c in m["per_client"]} == {40}
    server_log = (tmp_path / "server.log").read_text()
    assert len(set(re.findall(r"client (\d+) joined from (127\.0\.0\.1:\d+)", server_log))) == 6
    wlog = (tmp_path / "worker.log").read_text()
    assert "hosting 6 clients (0-5 of 6)" in wlog and wlog.count("server says: federation complete") == 6


def _smaps(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return {k: int(v) // 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc/<pid>/smaps_rollup")
def test_fifty_idle_virtual_clients_cost_little_memory(tmp_path, synthetic_mnist_dir, free_port):
    """A worker hosting 50 connected, idle clients is about as big as one hosting 1: the
    process (torch, data, one model) is paid once, a client adds a thread and a socket."""
    server = start("server.py", *server_args(free_port, tmp_path, synthetic_mnist_dir, 1, 52, "-v"),
                   log=tmp_path / "server.log")  # waits for 52: never starts a round; -v logs every join
    common = ["--num-clients", 51, "--port", free_port, "--data-dir", synthetic_mnist_dir, "--no-download",
              "--no-progress"]
    many = start("worker.py", "--client-ids", "0-49", *common, log=tmp_path / "many.log")
    one = start("worker.py", "--client-ids", "50", *common, log=tmp_path / "one.log")
    try:
        end = time.monotonic() + 120
        while (tmp_path / "server.log").read_text().count(" joined from ") < 51:
            assert time.monotonic() < end, (tmp_path / "server.log").read_text()[-2000:]
            assert many.poll() is None and one.poll() is None, (tmp_path / "many.log").read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(1.0)
        m_many, m_one = _smaps(many.pid), _smaps(one.pid)
        threads = len(list(Path(f"/proc/{many.pid}/task").iterdir()))
    finally:
        stop(server, many, one)
    assert threads >= 51  # a thread per client (and the main one)
    # 50 client processes would be ~50 x 0.5 GB; 50 virtual clients add tens of KB each.
    assert m_many["Rss"] - m_one["Rss"] < 60, (m_many, m_one)
    assert m_many["Rss"] < 1500, m_many


SPINNING_EXIT = """
import sys, threading, time, torch
from fl.common.exits import exit_now
torch.set_num_threads(1)
def spin():  # a hosted client's thread, inside torch when the process ends
    a = torch.randn(600, 600)
    while True:
        a = torch.tanh(a @ a)
threading.Thread(target=spin, daemon=True).start()
time.sleep(0.5)
print("ending", flush=True)
exit_now(2)
"""


def test_a_process_ending_while_a_thread_is_inside_torch_keeps_its_exit_status():
    """sys.exit here finalizes the interpreter under the spinning thread: SIGABRT, "terminate
    called without an active exception", and the status is lost (seen once in CI, when a
    worker's first client failed while its second was still busy). worker.py ends with
    exit_now."""
    import subprocess
    import sys

    from procs import REPO, env

    r = subprocess.run([sys.executable, "-c", SPINNING_EXIT], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=env(PYTHONPATH=str(REPO)))
    assert (r.returncode, r.stdout.strip()) == (2, "ending"), r.stderr[-2000:]
    assert "terminate called" not in r.stderr
