"""End to end, hostile peers against the real server process on 127.0.0.1.

Covers the security side of "Harden the federation": crafted pickles never execute,
shared-secret authentication, TLS, garbage connections, and update validation by fake
clients that do the real handshake (``security.client_handshake`` over a
``protocol.Connection``) and then misbehave. Refusals before authentication are logged
as counts per interval; with ``-v`` the server adds one debug line per dropped handshake,
which the tests below use to follow each connection. ``test_e2e_attacks.py`` replays the
attacks observed since.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import torch
from procs import client_args, log_of, refused_counts, server_args, start, stop, wait_for_line

from fl.wire.frames import FLAG_TAGGED, Connection, MsgType, encode_header
from fl.wire.handshake import client_handshake
from fl.wire.tls import write_certificate

TEST_LIMIT = 500
CLIENT_LIMIT = 500


# --- helpers ----------------------------------------------------------------------------

class Evil:
    """Unpickling this runs a shell command (in an unrestricted unpickler)."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class EvilSubprocess:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (subprocess.call, (["touch", self.path],))


def hostile_payloads(marker: Path) -> dict[str, bytes]:
    zipped = io.BytesIO()
    torch.save({"client_id": 0, "state": Evil(f"touch {marker}")}, zipped)
    return {
        "pickle-os.system": pickle.dumps({"client_id": 0, "x": Evil(f"touch {marker}")}, protocol=2),
        "pickle-subprocess": pickle.dumps(EvilSubprocess(marker), protocol=4),
        "torch.save-zip": zipped.getvalue(),
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_server(tmp: Path, port: int, data: Path, rounds: int, min_clients: int, *extra: object,
                 **env: str):
    log = tmp / "server.log"
    proc = start("server.py", *server_args(port, tmp, data, rounds, min_clients, "--test-limit", TEST_LIMIT, *extra),
                 log=log, **env)
    wait_for_line(log, "listening on", timeout=60, proc=proc)
    return proc, log


def start_client(tmp: Path, port: int, cid: int, num: int, data: Path, *extra: object, name: str | None = None,
                 **env: str):
    log = tmp / f"{name or f'client{cid}'}.log"
    return start("client.py", *client_args(port, cid, num, data, "--limit", CLIENT_LIMIT, *extra), log=log,
                 **env), log


def expect_exit(proc: subprocess.Popen, log: Path, code: int = 0, timeout: float = 90) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"{log.name} did not exit within {timeout} s:\n{log_of(log)[-3000:]}")
    if code == 0:
        assert rc == 0, f"{log.name} exited {rc}:\n{log_of(log)[-3000:]}"
    else:
        assert rc != 0, f"{log.name} exited 0 but should have failed:\n{log_of(log)[-3000:]}"


def lines_about(log_text: str, local_port: int) -> list[str]:
    pat = re.compile(rf"127\.0\.0\.1:{local_port}\b")
    return [ln for ln in log_text.splitlines() if pat.search(ln)]


def raw_connection(port: int, data: bytes, then_close: bool = True, wait_eof: float = 5.0) -> int:
    """Send raw bytes, wait for the server to hang up (or close ourselves); our local port."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    local = s.getsockname()[1]
    try:
        if data:
            s.sendall(data)
        if then_close:
            return local
        s.settimeout(wait_eof)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, socket.timeout):
            pass
        return local
    finally:
        s.close()


class FakeClient:
    """A client that does the real handshake, then does whatever the test says."""

    def __init__(self, port: int, client_id: int, num_samples: int = CLIENT_LIMIT, secret: bytes | None = None):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = Connection(sock)
        self.client_id = client_id
        self.num_samples = num_samples
        client_handshake(self.conn, client_id, num_samples, {"quantization": False}, secret, timeout=10)

    def model(self, timeout: float = 120):
        return self.conn.recv({MsgType.MODEL, MsgType.DONE}, timeout=timeout)

    def honest_body(self, msg) -> dict[str, Any]:
        """An update that passes validation: the global state back, unchanged."""
        return {"round": msg.body["round"], "num_samples": self.num_samples, "quantized": False,
                "metrics": {"loss": 1.0, "accuracy": 0.5, "train_s": 0.1},
                "state": {k: v.clone() for k, v in msg.body["state"].items()}}

    def close(self) -> None:
        self.conn.close()


# --- 1 & 7: hostile pickles and garbage connections --------------------------------------

def test_hostile_pickles_and_garbage_cost_one_log_line_each(tmp_path, mnist_dir, free_port):
    marker = tmp_path / "PWNED"
    payloads = hostile_payloads(marker)
    # Control: an unrestricted unpickler really does run these commands.
    control = tmp_path / "CONTROL"
    for raw in hostile_payloads(control).values():
        if raw[:2] == b"PK":
            continue  # a zip only torch.load understands; the pickles below prove the point
        pickle.loads(raw)
        assert control.exists()
        control.unlink()

    server, slog = start_server(tmp_path, free_port, mnist_dir, 1, 2, "-v")
    clients = []
    try:
        assert "no secret set" in log_of(slog)  # open server warns
        rng = random.Random(7)
        garbage: dict[str, bytes] = {
            "random": bytes(rng.randrange(256) for _ in range(4096)),
            "http": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n",
            "half-frame": encode_header(MsgType.HELLO, 200) + b"\x00" * 50,
            "half-header": b"FLMN\x01",
        }
        for name, raw in payloads.items():
            garbage[f"hello-{name}"] = encode_header(MsgType.HELLO, len(raw)) + raw
        ports = {name: raw_connection(free_port, data, then_close=name.startswith("half"))
                 for name, data in garbage.items()}
        clients = [start_client(tmp_path, free_port, i, 2, mnist_dir) for i in range(2)]
        # more garbage while the honest clients start and train
        ports["random-2"] = raw_connection(free_port, bytes(rng.randrange(256) for _ in range(100)))
        ports["empty"] = raw_connection(free_port, b"", then_close=True)
        expect_exit(server, slog, timeout=120)
        for proc, log in clients:
            expect_exit(proc, log, timeout=30)
    finally:
        stop(server, *(p for p, _ in clients))
    assert not marker.exists(), "a hostile pickle ran a command on the server"
    text = log_of(slog)
    for name, port in ports.items():
        lines = lines_about(text, port)
        assert len(lines) == 1, (name, lines)  # one debug line each (-v), nothing more
        assert "during handshake" in lines[0], (name, lines)
    for name in payloads:  # a pickle never reaches an unpickler before authentication
        assert "HELLO is not ASCII JSON" in lines_about(text, ports[f"hello-{name}"])[0]
    assert "bad magic" in lines_about(text, ports["http"])[0]
    # without -v, the same refusals are a few counted lines, not one each
    assert sum(int(n) for n in re.findall(r"refused (\d+) connection", text)) == len(ports)
    assert len(re.findall(r"refused \d+ connection", text)) < len(ports)
    assert "Traceback" not in text and "Warning" not in text
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1] and metrics[0]["clients"] == 2


# --- 2: shared secret ---------------------------------------------------------------------

def test_shared_secret_admits_holders_and_refuses_others(tmp_path, mnist_dir, free_port):
    secret = "correct horse battery staple"
    server, slog = start_server(tmp_path, free_port, mnist_dir, 1, 2, "--secret", secret)
    procs_ = []
    try:
        assert "no secret set" not in log_of(slog)
        procs_.append(start_client(tmp_path, free_port, 0, 2, mnist_dir, "--secret", secret))
        procs_.append(start_client(tmp_path, free_port, 1, 2, mnist_dir, FL_SECRET=secret))  # env var
        wrong = start_client(tmp_path, free_port, 2, 4, mnist_dir, "--secret", "wrong", name="wrong")
        none = start_client(tmp_path, free_port, 3, 4, mnist_dir, name="none")
        procs_ += [wrong, none]
        for proc, log in (wrong, none):
            expect_exit(proc, log, code=1, timeout=60)
        expect_exit(server, slog, timeout=120)
        for proc, log in procs_[:2]:
            expect_exit(proc, log, timeout=30)
    finally:
        stop(server, *(p for p, _ in procs_))
    text = log_of(slog)
    for cid, (proc, log) in ((2, wrong), (3, none)):
        assert proc.returncode == 1
        clog = log_of(log)
        assert re.search(r"ERROR\s+client: refused: .*secret", clog), clog
        assert "joined the federation" not in clog and "round 1" not in clog
        assert f"client {cid} joined" not in text
    assert refused_counts(text) == {"failed authentication": 2}, text  # the wrong and the missing secret
    assert "client 0 joined" in text and "client 1 joined" in text
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert metrics[0]["clients"] == 2 and metrics[0]["participants"] == 2


# --- 3: TLS -----------------------------------------------------------------------------------

def make_cert(folder: Path) -> tuple[Path, Path]:
    cert, key, _ = write_certificate(["127.0.0.1"], folder, days=1)
    return cert, key


def test_tls_run_completes_and_untrusted_or_plain_peers_fail(tmp_path, mnist_dir, free_port):
    cert, key = make_cert(tmp_path / "tls")
    other_cert, _ = make_cert(tmp_path / "other")
    secret = "tls-and-secret"
    server, slog = start_server(tmp_path, free_port, mnist_dir, 1, 1, "--tls-cert", cert, "--tls-key", key,
                                "--secret", secret, "-v")
    procs_ = []
    try:
        assert "(TLS)" in log_of(slog)
        plain = raw_connection(free_port, encode_header(MsgType.HELLO, 10) + b"\x00" * 10, then_close=False)
        untrusted = start_client(tmp_path, free_port, 1, 2, mnist_dir, "--tls-ca", other_cert, "--secret", secret,
                                 name="untrusted")
        procs_.append(untrusted)
        expect_exit(*untrusted, code=1, timeout=60)
        good = start_client(tmp_path, free_port, 0, 2, mnist_dir, "--tls-ca", cert, "--secret", secret)
        procs_.append(good)
        expect_exit(server, slog, timeout=120)
        expect_exit(*good, timeout=30)
    finally:
        stop(server, *(p for p, _ in procs_))
    assert re.search(r"refused: .*CERTIFICATE_VERIFY_FAILED", log_of(untrusted[1])), log_of(untrusted[1])
    text = log_of(slog)
    assert len(lines_about(text, plain)) == 1 and "during handshake" in lines_about(text, plain)[0]
    assert refused_counts(text).get("failed handshake (SSLError)", 0) >= 1, text  # the plain peer
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1] and metrics[0]["clients"] == 1


# --- 5 (+1 after authentication): update validation ----------------------------------------

def _first_float(state: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)


def _bad_update(kind: str, fake: FakeClient, msg, marker: Path) -> None:
    body = fake.honest_body(msg)
    state = body["state"]
    name = _first_float(state)
    if kind == "shape":
        state[name] = torch.zeros(3, 3)
    elif kind == "dtype":
        state[name] = state[name].double()
    elif kind == "nan":
        state[name][0].fill_(float("nan"))
    elif kind == "inf":
        state[name].view(-1)[5] = float("inf")
    elif kind == "keys":
        state["backdoor.weight"] = state.pop(name)
    elif kind == "samples":
        body["num_samples"] = 10 ** 12
    elif kind == "round":
        body["round"] = 99
    elif kind == "pickle":  # a hostile pickle inside a correctly authenticated frame
        fake.conn.send_payload(MsgType.UPDATE, hostile_payloads(marker)["torch.save-zip"], timeout=10)
        return
    elif kind == "oversized":  # a header announcing a TiB: refused before anything is allocated
        flags = FLAG_TAGGED if fake.conn.key else 0
        fake.conn.sock.sendall(encode_header(MsgType.UPDATE, 1 << 40, flags))
        return
    else:
        raise AssertionError(kind)
    fake.conn.send(MsgType.UPDATE, body, timeout=10)


BAD_KINDS = ["shape", "dtype", "nan", "inf", "keys", "samples", "round", "pickle", "oversized"]
REJECTED = {"shape": "expected", "dtype": "expected", "nan": "NaN", "inf": "NaN or Inf", "keys": "keys differ",
            "samples": "implausible sample count", "round": "round 99"}
DROPPED = {"pickle": "undecodable payload", "oversized": "exceeds the limit"}


def test_bad_updates_are_logged_and_excluded(tmp_path, mnist_dir, free_port):
    marker = tmp_path / "PWNED_AFTER_AUTH"
    secret = b"validation-secret"
    n_honest = 2
    ids = {kind: 10 + i for i, kind in enumerate(BAD_KINDS)}
    server, slog = start_server(tmp_path, free_port, mnist_dir, 1, n_honest + len(BAD_KINDS),
                                "--secret", secret.decode(), "--max-frame-mb", 16)
    results: dict[str, Any] = {}

    def misbehave(kind: str) -> None:
        try:
            fake = FakeClient(free_port, ids[kind], secret=secret)
            msg = fake.model()
            assert msg.type == MsgType.MODEL
            t0 = time.monotonic()
            _bad_update(kind, fake, msg, marker)
            try:  # what the server does next: DONE at the end of the run, or hang up on us
                results[kind] = (fake.conn.recv(timeout=90).type.name, time.monotonic() - t0)
            except Exception as exc:
                results[kind] = (type(exc).__name__, time.monotonic() - t0)
            fake.close()
        except Exception as exc:  # surfaced by the assertions below
            results[kind] = (f"error: {exc!r}", 0.0)

    threads = [threading.Thread(target=misbehave, args=(k,), daemon=True) for k in BAD_KINDS]
    clients = []
    try:
        for t in threads:
            t.start()
        clients = [start_client(tmp_path, free_port, i, n_honest, mnist_dir, "--secret", secret.decode())
                   for i in range(n_honest)]
        expect_exit(server, slog, timeout=150)
        for proc, log in clients:
            expect_exit(proc, log, timeout=30)
        for t in threads:
            t.join(timeout=30)
    finally:
        stop(server, *(p for p, _ in clients))
    assert not marker.exists()
    text = log_of(slog)
    for kind, needle in REJECTED.items():
        line = [ln for ln in text.splitlines() if f"rejected update from client {ids[kind]}:" in ln]
        assert len(line) == 1 and needle in line[0], (kind, line, results.get(kind))
        assert results[kind][0] == "DONE", (kind, results[kind])  # kept in the federation, told it ended
    for kind, needle in DROPPED.items():
        line = [ln for ln in text.splitlines() if f"client {ids[kind]} dropped out" in ln]
        assert len(line) == 1 and needle in line[0], (kind, line, results.get(kind))
        name, seconds = results[kind]
        assert name in ("ConnectionClosed", "ConnectionResetError", "BrokenPipeError"), (kind, results[kind])
        assert seconds < 10, (kind, seconds)  # hung up at once, did not wait for 1 TiB
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert len(metrics) == 1
    m = metrics[0]
    assert m["clients"] == n_honest and m["participants"] == n_honest + len(BAD_KINDS), m
    assert sorted(c["client_id"] for c in m["per_client"]) == list(range(n_honest))
    assert m["samples"] == sum(c["samples"] for c in m["per_client"])
    assert m["accuracy"] > 0.2  # the honest average learned; a NaN would give chance or worse
