"""End to end, faults against the real server and client processes on 127.0.0.1.

Covers the resilience side of "Harden the federation": connection limits and slow peers,
duplicate client ids, clients and the server killed mid-run (SIGKILL), resume from the
checkpoint, SIGTERM, and rounds retried when fewer than --min-fit updates arrive.
"""
from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from procs import client_args, expect_exit, log_of, refused_counts, server_args, start, stop, wait_for_line

from fl.server import checkpoint as ckpt
from fl.wire.errors import ConnectionClosed, RemoteError
from fl.wire.frames import Connection, MsgType, encode_body, encode_header
from fl.wire.handshake import client_handshake

TEST_LIMIT = 500
CLIENT_LIMIT = 500


# --- helpers (kept local so this file stands alone) ---------------------------------------

def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_server(tmp: Path, port: int, data: Path, rounds: int, min_clients: int, *extra: object,
                 name: str = "server"):
    log = tmp / f"{name}.log"
    proc = start("server.py", *server_args(port, tmp, data, rounds, min_clients, "--test-limit", TEST_LIMIT, *extra),
                 log=log)
    wait_for_line(log, "listening on", timeout=60, proc=proc)
    return proc, log


def start_client(tmp: Path, port: int, cid: int, num: int, data: Path, *extra: object, name: str | None = None,
                 limit: int = CLIENT_LIMIT):
    log = tmp / f"{name or f'client{cid}'}.log"
    return start("client.py", *client_args(port, cid, num, data, "--limit", limit, *extra), log=log), log


def lines_about(text: str, local_port: int) -> list[str]:
    pat = re.compile(rf"127\.0\.0\.1:{local_port}\b")
    return [ln for ln in text.splitlines() if pat.search(ln)]


def seconds_until_closed(sock: socket.socket, limit: float = 15.0) -> float:
    """How long until the server hangs up on a socket that sends nothing more."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, socket.timeout):
        pass
    return time.monotonic() - t0


class FakeClient:
    """Real handshake (security.client_handshake over protocol.Connection), scripted afterwards."""

    def __init__(self, port: int, client_id: int, num_samples: int = CLIENT_LIMIT):
        self.conn = Connection(socket.create_connection(("127.0.0.1", port), timeout=10))
        self.num_samples = num_samples
        client_handshake(self.conn, client_id, num_samples, {"quantization": False}, None, timeout=10)

    def honest_body(self, msg) -> dict[str, Any]:
        return {"round": msg.body["round"], "num_samples": self.num_samples, "quantized": False,
                "metrics": {"loss": 1.0, "accuracy": 0.5, "train_s": 0.1},
                "state": {k: v.clone() for k, v in msg.body["state"].items()}}


# --- 4: limits: slow peers, oversized frames, --max-connections, duplicate ids -------------

def test_limits_slow_peers_oversize_max_connections_and_duplicate_ids(tmp_path, mnist_dir, free_port):
    """Handshakes in progress have slots per address (--max-pending-per-address) and a time
    limit for the whole handshake; authenticated sessions have slots of their own
    (--max-connections). -v gives one debug line per dropped handshake to follow each peer."""
    hs_timeout, max_pending, max_conn = 1.5, 4, 2
    server, slog = start_server(tmp_path, free_port, mnist_dir, 1, 2, "--handshake-timeout", hs_timeout,
                                "--max-pending-per-address", max_pending, "--max-connections", max_conn, "-v")
    clients: list = []
    addr = ("127.0.0.1", free_port)
    dribble_result: dict[str, float] = {}

    def dribble(sock: socket.socket, key: str, data: bytes = encode_header(MsgType.HELLO, 200) + bytes(200)) -> None:
        """A valid header and payload, one byte every 0.2 s: never completes a frame in time."""
        t0 = time.monotonic()
        try:
            for b in data:
                sock.sendall(bytes([b]))
                time.sleep(0.2)
        except OSError:
            pass
        dribble_result[key] = time.monotonic() - t0

    try:
        # --max-pending-per-address: fill this address's handshake slots with peers that never authenticate ...
        silent = [socket.create_connection(addr, timeout=5) for _ in range(max_pending - 1)]
        dribbler = socket.create_connection(addr, timeout=5)
        t = threading.Thread(target=dribble, args=(dribbler, "first"), daemon=True)
        t.start()
        time.sleep(0.3)
        # ... then one more is turned away at once, with a log line
        extra = socket.create_connection(addr, timeout=5)
        extra_port = extra.getsockname()[1]
        assert seconds_until_closed(extra) < 1.0
        extra.close()
        # the silent and dribbling peers are dropped after --handshake-timeout, not later
        silent_ports = [s.getsockname()[1] for s in silent]
        waits = [seconds_until_closed(s) for s in silent]
        assert all(w < hs_timeout + 2.0 for w in waits), waits
        t.join(timeout=10)
        assert dribble_result["first"] < hs_timeout + 2.0, dribble_result
        dribbler_port = dribbler.getsockname()[1]
        for s in (*silent, dribbler):
            s.close()

        # a peer that sends its HELLO in time but dribbles its AUTH: the budget covers the whole handshake
        slow = socket.create_connection(addr, timeout=5)
        slow_port = slow.getsockname()[1]
        hello = encode_body(MsgType.HELLO, {"client_id": 5, "num_samples": 10, "options": {}, "nonce": "00" * 32})
        t0 = time.monotonic()
        slow.sendall(encode_header(MsgType.HELLO, len(hello)) + hello)
        Connection(slow).recv(MsgType.CHALLENGE, timeout=5)
        time.sleep(hs_timeout * 0.6)
        auth = encode_body(MsgType.AUTH, {"proof": None})
        dribble(slow, "auth", encode_header(MsgType.AUTH, len(auth)) + auth)
        assert time.monotonic() - t0 < hs_timeout + 1.0
        slow.close()

        # a header announcing 1 TiB is refused before anything is read or allocated
        big = socket.create_connection(addr, timeout=5)
        big_port = big.getsockname()[1]
        big.sendall(encode_header(MsgType.HELLO, 1 << 40))
        assert seconds_until_closed(big) < 1.0
        big.close()

        # duplicate client ids: the newest authenticated connection replaces the older one
        first = FakeClient(free_port, 7)
        second = FakeClient(free_port, 7)
        first.conn.sock.settimeout(5)
        t0 = time.monotonic()
        try:
            msg = first.conn.recv(timeout=5)
            assert msg.type == MsgType.DONE, msg.type  # told why, if the DONE got through
        except (ConnectionClosed, OSError):
            pass
        assert time.monotonic() - t0 < 5
        wait_for_line(slog, "client 7 reconnected", timeout=5)
        first.conn.close()
        second_port = second.conn.sock.getsockname()[1]
        second.conn.close()  # and a client that hangs up while idle no longer counts as connected
        wait_for_line(slog, f"client 7 left (127.0.0.1:{second_port})", timeout=5)

        # the honest federation runs, with more slow peers arriving during its rounds
        clients = [start_client(tmp_path, free_port, i, 2, mnist_dir) for i in range(2)]
        wait_for_line(slog, "client 0 joined", timeout=60, proc=server)
        wait_for_line(slog, "client 1 joined", timeout=60, proc=server)
        # --max-connections: sessions have slots of their own, all taken now; one more is told so
        try:
            FakeClient(free_port, 30).conn.recv(MsgType.MODEL, timeout=5)
            over = "admitted"
        except RemoteError as exc:
            over = str(exc)
        late = socket.create_connection(addr, timeout=5)
        late_dribbler = socket.create_connection(addr, timeout=5)
        threading.Thread(target=dribble, args=(late_dribbler, "late"), daemon=True).start()
        expect_exit(server, slog, timeout=120)
        for proc, log in clients:
            expect_exit(proc, log, timeout=30)
        late.close()
    finally:
        stop(server, *(p for p, _ in clients))
    assert over == "server full", over
    text = log_of(slog)
    assert not lines_about(text, extra_port)  # turned away before any handshake: counted, not a line
    counts = refused_counts(text)
    assert counts.get("too many handshakes from one address (--max-pending-per-address)", 0) >= 1, counts
    assert counts.get("server full (--max-connections)") == 1, counts
    for port in (*silent_ports, dribbler_port, slow_port):
        lines = lines_about(text, port)
        assert len(lines) == 1 and "during handshake" in lines[0] and "timed out" in lines[0], lines
    assert counts.get("failed handshake (TimeoutError)", 0) >= len(silent_ports) + 2, counts
    big_lines = lines_about(text, big_port)
    assert len(big_lines) == 1 and "exceeds the limit" in big_lines[0], big_lines
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1]
    assert metrics[0]["clients"] == 2 and metrics[0]["participants"] == 2, metrics  # the ghost of id 7 left
    assert "Traceback" not in text


# --- 6: faults --------------------------------------------------------------------------------

def test_client_killed_in_round_2_run_completes_and_restarted_client_rejoins(tmp_path, mnist_dir, free_port):
    server, slog = start_server(tmp_path, free_port, mnist_dir, 3, 3, "--min-fit", 2, "--round-timeout", 40)
    clients: list = []
    try:
        clients = [start_client(tmp_path, free_port, i, 3, mnist_dir) for i in range(2)]
        victim, vlog = start_client(tmp_path, free_port, 2, 3, mnist_dir, name="victim")
        clients.append((victim, vlog))
        # frozen right after its round-1 update, so it is surely still "training" in round 2
        wait_for_line(vlog, "round 1:", timeout=90, proc=victim)
        victim.send_signal(signal.SIGSTOP)
        wait_for_line(slog, "round 1/3", timeout=30, proc=server)  # round 2 is under way
        time.sleep(0.3)
        assert victim.poll() is None
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        wait_for_line(slog, "client 2 dropped out", timeout=30, proc=server)
        again, alog = start_client(tmp_path, free_port, 2, 3, mnist_dir, name="restarted")
        clients.append((again, alog))
        expect_exit(server, slog, timeout=120)
        for proc, log in (*clients[:2], clients[3]):
            expect_exit(proc, log, timeout=30)
    finally:
        stop(server, *(p for p, _ in clients))
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert [m["clients"] for m in metrics] == [3, 2, 3], metrics
    assert metrics[1]["participants"] == 3
    assert sorted(c["client_id"] for c in metrics[2]["per_client"]) == [0, 1, 2]
    assert "round 2: client 2 dropped out" in log_of(slog)


def test_server_killed_after_round_1_resumes_and_clients_reconnect(tmp_path, mnist_dir, free_port):
    args = (3, 2)
    server, slog = start_server(tmp_path, free_port, mnist_dir, *args)
    clients: list = []
    restarted = None
    try:
        clients = [start_client(tmp_path, free_port, i, 2, mnist_dir) for i in range(2)]
        wait_for_line(slog, "round 1/3", timeout=90, proc=server)
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert all(p.poll() is None for p, _ in clients)  # the clients keep retrying
        restarted, rlog = start_server(tmp_path, free_port, mnist_dir, *args, "--resume", name="server2")
        expect_exit(restarted, rlog, timeout=120)
        for proc, log in clients:
            expect_exit(proc, log, timeout=30)
    finally:
        stop(server, *(p for p, _ in clients), *([restarted] if restarted else []))
    resumed = re.search(r"resumed from .* after round (\d+)", log_of(rlog))
    assert resumed and int(resumed.group(1)) in (1, 2), log_of(rlog)
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2, 3], [m["round"] for m in metrics]
    assert all(m["clients"] == 2 for m in metrics)
    for i in range(2):
        assert "reconnecting" in log_of(tmp_path / f"client{i}.log")
    assert ckpt.load(tmp_path / "ckpt.pt")["round"] == 3


def test_sigterm_stops_server_cleanly_and_tells_clients(tmp_path, mnist_dir, free_port):
    server, slog = start_server(tmp_path, free_port, mnist_dir, 6, 2)
    clients: list = []
    try:
        # client 1 trains longer, so the signal lands while it is still busy with round 2
        clients = [start_client(tmp_path, free_port, i, 2, mnist_dir, limit=1500 if i else CLIENT_LIMIT)
                   for i in range(2)]
        wait_for_line(slog, "round 1/6", timeout=90, proc=server)
        t0 = time.monotonic()
        server.send_signal(signal.SIGTERM)
        expect_exit(server, slog, timeout=30)
        stopped_in = time.monotonic() - t0
        for proc, log in clients:
            expect_exit(proc, log, timeout=30)
    finally:
        stop(server, *(p for p, _ in clients))
    assert stopped_in < 20
    assert "received SIGTERM" in log_of(slog)
    saved = ckpt.load(tmp_path / "ckpt.pt")
    assert 1 <= saved["round"] < 6
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["round"] for m in metrics] == list(range(1, saved["round"] + 1))
    for i in range(2):
        assert "server says: server stopping" in log_of(tmp_path / f"client{i}.log")


def test_round_with_too_few_updates_is_retried(tmp_path, mnist_dir, free_port):
    """--min-fit 2 with one honest client and one that first times out, then sends a bad
    update, then behaves: round 1 is run three times and aggregated once, with both."""
    server, slog = start_server(tmp_path, free_port, mnist_dir, 1, 2, "--min-fit", 2, "--round-timeout", 5)
    clients: list = []
    seen: list[str] = []
    try:
        clients = [start_client(tmp_path, free_port, 0, 2, mnist_dir)]
        fake = FakeClient(free_port, 1)
        msg = fake.conn.recv({MsgType.MODEL}, timeout=90)  # attempt 1: stay silent past the deadline
        seen.append(f"model {msg.body['round']}")
        try:
            fake.conn.recv(timeout=30)
        except (ConnectionClosed, OSError):
            seen.append("dropped")  # the server gave up on us at the round deadline
        fake.conn.close()
        fake = FakeClient(free_port, 1)  # rejoin
        msg = fake.conn.recv({MsgType.MODEL}, timeout=60)  # attempt 2: a NaN update
        seen.append(f"model {msg.body['round']}")
        body = fake.honest_body(msg)
        next(v for v in body["state"].values() if v.is_floating_point()).fill_(float("nan"))
        fake.conn.send(MsgType.UPDATE, body, timeout=10)
        msg = fake.conn.recv({MsgType.MODEL}, timeout=60)  # attempt 3: a valid update
        seen.append(f"model {msg.body['round']}")
        fake.conn.send(MsgType.UPDATE, fake.honest_body(msg), timeout=10)
        seen.append(fake.conn.recv(timeout=60).type.name)
        fake.conn.close()
        expect_exit(server, slog, timeout=60)
        expect_exit(*clients[0], timeout=30)
    finally:
        stop(server, *(p for p, _ in clients))
    assert seen == ["model 1", "dropped", "model 1", "model 1", "DONE"], seen
    text = log_of(slog)
    assert "round 1: timed out" in text
    # Two retries; the first attempt has 1 update, or 0 when a loaded machine kept the honest
    # client from finishing its training within the 5 s round timeout.
    assert len(re.findall(r"round 1: only [01] of 2 updates \(need --min-fit 2\); retrying the round", text)) == 2, text
    assert "rejected update from client 1" in text
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert len(metrics) == 1 and metrics[0]["round"] == 1 and metrics[0]["clients"] == 2, metrics
