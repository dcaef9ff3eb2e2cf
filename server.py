"""Federated-learning server: holds the global ImprovedCNN, runs FedAvg rounds over TCP.

Lifecycle, in the manner of ``socketserver``: a :class:`FLServer` accepts connections and
gives each one a :class:`ClientHandler` thread, which authenticates the client and then
serves it rounds that the :class:`Federation` (the main thread) hands out: send the global
model, read the update, validate it, fold it into the running FedAvg sum. After each round
the new model is sent out at once and the finished one is evaluated on the MNIST test set
in the background, then checkpointed atomically and logged as one JSON line.

    python server.py --rounds 5 --min-clients 3
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import queue
import random
import select
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field as dc_field
from typing import Any

import torch
from tqdm import tqdm

import checkpoint as ckpt
from aggregation import FedAvg, InvalidUpdate, validate_flat, validate_num_samples, validate_state
from data import DataError, load_mnist, resolve_data_dir
from layout import LayoutError
from logs import setup_logging
from model import ImprovedCNN
from protocol import (DEFAULT_MAX_FRAME, MIB, Connection, MsgType, ProtocolError, decode_payload, encode_payload,
                      field)
from quantization import QuantizationError, apply_delta, dequantize_state, quantize_state, state_delta
from security import AuthError, Peer, resolve_secret, server_handshake, server_tls_context
from training import evaluate, round_lr

log = logging.getLogger("server")
MAX_SAMPLES = 10_000_000  # a sample count beyond this is a lie, whatever the data set
INGEST_WAIT_S = 2.0  # longest a handler waits for a receive buffer before reading into new memory
INGEST_SLOTS = 2  # receive buffers: one update read from its socket while another is decoded


@dataclass
class RoundTask:
    """What a handler needs to serve one round to its client."""

    round: int
    payload: bytes  # the MODEL message with the full state, encoded once for all clients
    base: dict[str, torch.Tensor]  # the state clients train from, to rebuild quantized deltas
    deadline: float  # time.monotonic() by which the update must have arrived
    view_id: int = 0  # which broadcast this is (--quantize-broadcast)
    compact: bytes | None = None  # the same model as an 8-bit delta to broadcast view_id - 1


@dataclass(frozen=True)
class Stop:
    """Queued to a session instead of a round: send DONE with this reason and close."""

    reason: str


@dataclass
class Session:
    peer: Peer
    conn: Connection
    address: str
    tasks: "queue.Queue[Any]" = dc_field(default_factory=queue.Queue)
    view_id: int | None = None  # the last broadcast this client received in full or as a delta

    @property
    def client_id(self) -> int:
        return self.peer.client_id


@dataclass
class RoundState:
    number: int
    participants: dict[int, Session]
    accumulator: FedAvg
    reported: set[int] = dc_field(default_factory=set)
    clients: list[dict[str, Any]] = dc_field(default_factory=list)  # accepted updates' metrics
    bytes_up: int = 0
    bytes_down: int = 0
    lr: float = 0.0
    started: float = dc_field(default_factory=time.monotonic)  # broadcast time
    seconds: float = 0.0  # broadcast to last update folded in


class Ingest:
    """Decodes, validates and folds the updates, one at a time, on a thread of its own.

    Handlers only move bytes: each receives its client's UPDATE frame into one of a few
    reusable buffers and hands it over. A socket read so overlaps the previous update's
    decoding, memory holds at most ``slots`` frames however many clients report, and
    ``torch.load``'s pure-Python unpickling runs on one thread rather than on fifty that
    fight for the GIL (and each grow a stack for it).
    """

    def __init__(self, fed: "Federation", slots: int, frame_size: int) -> None:
        self.fed = fed
        self.buffers: "queue.Queue[bytearray]" = queue.Queue()
        for _ in range(slots):
            self.buffers.put(bytearray(frame_size))
        self.jobs: "queue.SimpleQueue[tuple[Any, ...]]" = queue.SimpleQueue()
        threading.Thread(target=self._run, name="ingest", daemon=True).start()

    def buffer(self, timeout: float) -> bytearray | None:
        """A free receive buffer, or None if slow uploads hold them all for ``timeout``."""
        try:
            return self.buffers.get(timeout=timeout)
        except queue.Empty:
            return None

    def give_back(self, buffer: bytearray) -> None:
        self.buffers.put(buffer)

    def process(self, session: "Session", task: RoundTask, payload: bytes | bytearray | memoryview,
                up: int, down: int) -> None:
        """Decode and fold one update on the ingest thread; returns when it is done (the
        payload's buffer is free again). Raises ProtocolError if it cannot be decoded."""
        done, failure = threading.Event(), []
        self.jobs.put((session, task, payload, up, down, done, failure))
        done.wait()
        if failure:
            raise failure[0]

    def _run(self) -> None:
        while True:
            session, task, payload, up, down, done, failure = self.jobs.get()
            try:
                self.fed.submit(session, task, decode_payload(payload), up, down)
            except ProtocolError as exc:
                failure.append(exc)
            except Exception as exc:  # never let one update stop the ingest thread
                log.exception("round %d: unexpected error ingesting client %d's update", task.round, session.client_id)
                failure.append(ProtocolError(f"internal error: {_one_line(exc)}"))
            finally:
                del payload
                done.set()


class Federation:
    """Round logic and shared state; the handlers and the main thread meet here."""

    def __init__(self, args: argparse.Namespace, test_set: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.args = args
        self.test_images, self.test_labels = test_set
        self.global_state = {k: v.detach().clone() for k, v in ImprovedCNN().state_dict().items()}
        self.history = ckpt.History()
        self.start_round = 0
        self.sessions: dict[int, Session] = {}
        self.lock = threading.Condition()
        self.round: RoundState | None = None
        self.stop = threading.Event()
        # One running sum for the whole run, reset each round: no model-sized allocation per round.
        self.accumulator = FedAvg(self.global_state)
        layout = self.accumulator.layout  # a float update's frame is this plus a little metadata
        self.ingest = Ingest(self, INGEST_SLOTS, 4 * layout.float_numel + 8 * layout.int_numel + 64 * 1024)
        self.view: dict[str, torch.Tensor] | None = None  # what clients hold (--quantize-broadcast)
        self.view_id = 0

    # --- called from handler threads ---------------------------------------------------

    def register(self, session: Session) -> None:
        with self.lock:
            old = self.sessions.get(session.client_id)
            self.sessions[session.client_id] = session
            self.lock.notify_all()
        if old is not None:
            # The newest authenticated connection wins: a restarted client must be able
            # to rejoin before the server notices that its old socket is dead.
            log.warning("client %d reconnected from %s; dropping its old connection from %s",
                        session.client_id, session.address, old.address)
            old.conn.close()
            old.tasks.put(Stop("replaced by a newer connection"))

    def unregister(self, session: Session) -> None:
        with self.lock:
            if self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
            self._report(session, None)

    def submit(self, session: Session, task: RoundTask, body: dict[str, Any], up: int, down: int) -> None:
        """Validate one update and fold it into the round's sum; a bad one is excluded."""
        rnd = self.round
        cid = session.client_id
        try:
            if field(body, "round", int) != task.round:
                raise InvalidUpdate(f"update for round {body['round']}, expected {task.round}")
            num_samples = validate_num_samples(body.get("num_samples"), session.peer.num_samples)
            metrics = field(body, "metrics", dict)
            flat = None
            if field(body, "quantized", bool):
                state = apply_delta(task.base, dequantize_state(field(body, "delta", dict), like=task.base))
            elif "flat" in body:  # what client.py sends: the cheap form to decode, check and fold
                flat = self.accumulator.layout.unpack(body["flat"])
                validate_flat(flat[0])
            else:  # a plain state_dict, for other clients
                state = field(body, "state", dict)
            if flat is None:
                validate_state(state, task.base)
        except (InvalidUpdate, ProtocolError, QuantizationError, LayoutError) as exc:
            log.warning("round %d: rejected update from client %d: %s", task.round, cid, exc)
            with self.lock:
                if rnd is not None and rnd.number == task.round:
                    rnd.bytes_up += up
                    rnd.bytes_down += down
                self._report(session, task.round)
            return
        with self.lock:
            if rnd is None or rnd is not self.round or rnd.number != task.round or cid in rnd.reported:
                return  # the round ended (timeout) before this update arrived (its sum may be reset)
            if flat is None:
                rnd.accumulator.add(state, num_samples)
            else:
                rnd.accumulator.add_flat(*flat, num_samples)
            rnd.bytes_up += up
            rnd.bytes_down += down
            rnd.clients.append({
                "client_id": cid, "samples": num_samples, "quantized": bool(body["quantized"]),
                "bytes_up": up, "train_s": _num(metrics.get("train_s")),
                "loss": _num(metrics.get("loss")), "accuracy": _num(metrics.get("accuracy")),
            })
            self._report(session, task.round)

    def fail(self, session: Session, round_num: int, down: int, reason: str) -> None:
        log.warning("round %d: client %d dropped out: %s", round_num, session.client_id, reason)
        with self.lock:
            if self.round is not None and self.round.number == round_num:
                self.round.bytes_down += down
            self._report(session, round_num)

    def _report(self, session: Session, round_num: int | None) -> None:
        rnd = self.round
        if rnd is not None and session.client_id in rnd.participants and \
                rnd.participants[session.client_id] is session and (round_num in (None, rnd.number)):
            rnd.reported.add(session.client_id)
            self.lock.notify_all()

    # --- the main thread ---------------------------------------------------------------

    def wait_for_clients(self) -> dict[int, Session] | None:
        """Wait for --min-clients; after --round-timeout settle for --min-fit."""
        start = time.monotonic()
        last_log = 0.0
        with self.lock:
            while not self.stop.is_set():
                n = len(self.sessions)
                waited = time.monotonic() - start
                if n >= self.args.min_clients or (n >= self.args.min_fit and waited >= self.args.round_timeout):
                    return dict(self.sessions)
                if waited - last_log >= 30 or last_log == 0.0:
                    log.info("waiting for clients: %d of %d connected", n, self.args.min_clients)
                    last_log = max(waited, 1e-9)
                self.lock.wait(timeout=1.0)
        return None

    def run_round(self, number: int) -> RoundState | None:
        """Broadcast, collect until everyone reported or the deadline, return the round."""
        participants = self.wait_for_clients()
        if participants is None:
            return None
        lr = round_lr(self.args.lr, number, self.args.rounds, self.args.lr_schedule)
        config = {"epochs": self.args.local_epochs, "lr": lr, "batch_size": self.args.batch_size,
                  "augment": not self.args.no_augment, "hflip": self.args.hflip}
        header = {"round": number, "rounds": self.args.rounds, "config": config}
        base, compact = self.broadcast_state()
        payload = encode_payload({**header, "state": base, "view_id": self.view_id})
        if compact is not None:
            compact = encode_payload({**header, "delta": compact, "base_view": self.view_id - 1,
                                      "view_id": self.view_id})
        self.accumulator.reset()
        rnd = RoundState(number, participants, self.accumulator, lr=lr)
        deadline = rnd.started + self.args.round_timeout
        with self.lock:
            self.round = rnd
            # A session that vanished between the snapshot and now counts as reported.
            for cid, s in participants.items():
                if self.sessions.get(cid) is not s:
                    rnd.reported.add(cid)
        task = RoundTask(number, payload, base, deadline, self.view_id, compact)
        for s in participants.values():
            s.tasks.put(task)
        with self.lock:
            while len(rnd.reported) < len(participants) and not self.stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(participants) - rnd.reported)
                    log.warning("round %d: timed out after %.0f s waiting for clients %s",
                                number, self.args.round_timeout, missing)
                    for cid in missing:  # their handlers hang up on them at this same deadline;
                        if self.sessions.get(cid) is participants[cid]:  # a retry must not count them
                            del self.sessions[cid]
                    break
                self.lock.wait(timeout=min(remaining, 1.0))
            self.round = None
        rnd.seconds = time.monotonic() - rnd.started
        return rnd

    def broadcast_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """The state clients will train from this round, and its 8-bit delta form.

        With --quantize-broadcast the server keeps the model exactly as clients rebuild it
        (the "view") and sends only quantize(global - view). Clients then train from the
        view, so the quantization error of one broadcast is never compounded by the next:
        each delta is measured from what clients really hold.
        """
        self.view_id += 1
        if not self.args.quantize_broadcast:
            return self.global_state, None
        if self.view is None:
            self.view = self.global_state
            return self.view, None
        packed = quantize_state(state_delta(self.global_state, self.view))
        self.view = apply_delta(self.view, dequantize_state(packed, like=self.view))
        return self.view, packed

    def stop_all(self, reason: str) -> None:
        with self.lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            s.tasks.put(Stop(reason))

    def drain(self, timeout: float) -> int:
        """Wait until every handler has told its client DONE and hung up; how many are left.
        A client busy training for an abandoned round hears it once its update arrives."""
        end = time.monotonic() + timeout
        with self.lock:
            while self.sessions and (left := end - time.monotonic()) > 0:
                self.lock.wait(timeout=min(left, 0.2))
            return len(self.sessions)


def _num(value: Any) -> float | None:
    """A client-reported figure, kept only if it is a finite, non-negative number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


class ClientHandler(socketserver.BaseRequestHandler):
    """One client connection: handshake, then rounds until told to stop."""

    server: "FLServer"

    def setup(self) -> None:
        self.address = "%s:%s" % self.client_address[:2]

    def handle(self) -> None:
        fed, args = self.server.federation, self.server.args
        sock = self.request
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(args.handshake_timeout)
            end = time.monotonic() + args.handshake_timeout  # one budget for TLS and authentication
            if self.server.tls is not None:
                sock = self.server.tls.wrap_socket(sock, server_side=True)
            conn = Connection(sock, max_frame=args.max_frame_mb * MIB)
            peer = server_handshake(conn, self.server.secret, timeout=max(0.01, end - time.monotonic()))
            peer.num_samples = min(peer.num_samples, MAX_SAMPLES)
            if peer.num_samples < 1:
                raise ProtocolError(f"client {peer.client_id} has no samples")
        except AuthError as exc:
            log.warning("refused %s: %s", self.address, exc)
            return
        except (ProtocolError, OSError, ssl.SSLError, ValueError) as exc:
            log.warning("dropped connection from %s during handshake: %s", self.address, _one_line(exc))
            return
        session = Session(peer, conn, self.address)
        fed.register(session)
        log.info("client %d joined from %s (%d samples%s)", peer.client_id, self.address,
                 peer.num_samples, ", quantized updates" if peer.options.get("quantization") else "")
        try:
            self.serve(session)
        finally:
            fed.unregister(session)
            conn.close()

    def serve(self, session: Session) -> None:
        fed, conn = self.server.federation, session.conn
        while True:
            try:
                task = session.tasks.get(timeout=1.0)
            except queue.Empty:
                if fed.sessions.get(session.client_id) is not session:
                    return  # dropped at a round deadline (or replaced): it will reconnect
                if _hung_up(conn.sock):  # an idle client that is gone must not count as connected
                    log.info("client %d left (%s)", session.client_id, session.address)
                    return
                continue
            if isinstance(task, Stop):
                try:
                    conn.send(MsgType.DONE, {"reason": task.reason}, timeout=5.0)
                except (OSError, ProtocolError):
                    pass
                return
            sent0, recv0 = conn.bytes_sent, conn.bytes_received
            try:
                delta_ok = task.compact is not None and session.view_id == task.view_id - 1
                conn.send_payload(MsgType.MODEL, task.compact if delta_ok else task.payload,
                                  timeout=max(1.0, task.deadline - time.monotonic()))
                session.view_id = task.view_id
                _wait_readable(conn.sock, task.deadline)  # the client trains meanwhile: no slot held
                # At most INGEST_SLOTS updates in memory, so N clients cost a few models, not N;
                # a peer that uploads slowly holds the others up for at most INGEST_WAIT_S.
                buffer = fed.ingest.buffer(timeout=INGEST_WAIT_S)
                try:
                    frame = conn.recv_frame(MsgType.UPDATE, timeout=max(0.1, task.deadline - time.monotonic()),
                                            buffer=buffer)
                    fed.ingest.process(session, task, frame.payload, conn.bytes_received - recv0,
                                       conn.bytes_sent - sent0)
                    del frame  # nor the update while this client trains for the next round
                finally:
                    if buffer is not None:
                        fed.ingest.give_back(buffer)
            except (ProtocolError, OSError, ssl.SSLError) as exc:
                fed.fail(session, task.round, conn.bytes_sent - sent0, _one_line(exc))
                return
            del task  # nor this round's MODEL payload


class FLServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], federation: Federation, args: argparse.Namespace,
                 secret: bytes | None, tls: ssl.SSLContext | None) -> None:
        self.federation = federation
        self.args = args
        self.secret = secret
        self.tls = tls
        self.slots = threading.BoundedSemaphore(args.max_connections)
        super().__init__(address, ClientHandler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            log.warning("refused %s:%s: %d connections already open", *client_address[:2], self.args.max_connections)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unexpected error serving %s", client_address)


def _wait_readable(sock: socket.socket, deadline: float) -> None:
    """Block until the peer has sent something, hung up, or the deadline passed, without
    reading anything (the read that follows reports which)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return
    select.select([sock], [], [], max(0.0, deadline - time.monotonic()))


def _hung_up(sock: socket.socket) -> bool:
    """Whether an idle peer has closed its end. Peeks at the raw socket, so nothing is
    consumed (under TLS too: ``socket.socket.recv`` bypasses the SSL layer)."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):  # reset, or already closed here
        return True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- the command line ------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Federated-learning server: FedAvg over TCP clients, evaluated on the MNIST test set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    net.add_argument("--port", type=int, default=8080, help="TCP port (0 picks a free one)")
    net.add_argument("--secret", default=None, help="shared secret clients must prove (default: $FL_SECRET; none = open server)")
    net.add_argument("--tls-cert", default=None, help="PEM certificate: serve over TLS")
    net.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    net.add_argument("--max-connections", type=int, default=128, help="concurrent connections allowed")
    net.add_argument("--max-frame-mb", type=int, default=DEFAULT_MAX_FRAME // MIB, help="largest frame accepted, MiB")
    net.add_argument("--handshake-timeout", type=float, default=10.0, help="seconds a new connection has to authenticate")
    fl = p.add_argument_group("federation")
    fl.add_argument("--rounds", type=int, default=5, help="federated rounds to run")
    fl.add_argument("--min-clients", type=int, default=2, help="clients that must be connected before a round starts")
    fl.add_argument("--min-fit", type=int, default=1, help="updates a round needs to be aggregated after a timeout (else retried)")
    fl.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for the updates of a round")
    fl.add_argument("--quantize-broadcast", action="store_true",
                    help="send the global model as an 8-bit delta to clients that hold the previous one")
    fl.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (sent to clients)")
    fl.add_argument("--lr", type=float, default=1e-3, help="clients' Adam learning rate in round 1")
    fl.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                    help="cosine decays the learning rate to 0.1x by the last round")
    fl.add_argument("--batch-size", type=int, default=64, help="clients' batch size")
    fl.add_argument("--no-augment", action="store_true", help="tell clients to train without augmentation")
    fl.add_argument("--hflip", action="store_true", help="add random horizontal flips to augmentation (hurts digits)")
    fl.add_argument("--seed", type=int, default=0, help="seed of the initial global model")
    io = p.add_argument_group("data and output")
    io.add_argument("--data-dir", default=None, help="folder with the MNIST files (default: $MNIST_DATA_DIR or ./data)")
    io.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    io.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only (quick runs)")
    io.add_argument("--checkpoint", default="checkpoint.pt", help="global model, round and metrics, written after every round")
    io.add_argument("--resume", action="store_true", help="continue from --checkpoint after the last completed round")
    io.add_argument("--metrics", default="metrics.jsonl", help="JSON Lines file, one object per round")
    io.add_argument("--threads", type=int, default=None, help="torch threads for evaluation (default: all cores)")
    io.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    io.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.min_clients < 1 or args.min_fit < 1:
        p.error("--rounds, --min-clients and --min-fit must be at least 1")
    if args.min_fit > args.min_clients:
        p.error("--min-fit cannot exceed --min-clients")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port} is not a TCP port")
    return args


def summary(history: ckpt.History, elapsed: float, args: argparse.Namespace) -> str:
    if not history:
        return "no round completed"
    best = max(history, key=lambda m: m["accuracy"])
    up = sum(m["bytes_up"] for m in history) / MIB
    down = sum(m["bytes_down"] for m in history) / MIB
    rows = [("rounds", f"{history[-1]['round']}"),
            ("final accuracy", f"{history[-1]['accuracy']:.2%} (loss {history[-1]['loss']:.4f})"),
            ("best accuracy", f"{best['accuracy']:.2%} (round {best['round']})"),
            ("bytes up / down", f"{up:.1f} MiB / {down:.1f} MiB"),
            ("time", f"{elapsed:.1f} s"),
            ("checkpoint", str(args.checkpoint)), ("metrics", str(args.metrics))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives busy threads their own malloc arenas (up to 8 per core) and keeps freed
    blocks in each, so with a thread per client every update-sized buffer ends up cached
    once per arena. Two arenas bound that; the GIL serialises the threads anyway."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(-8, n)  # M_ARENA_MAX
    except (AttributeError, OSError, TypeError):  # not glibc
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    _limit_malloc_arenas()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        test_images, test_labels = load_mnist(resolve_data_dir(args.data_dir), train=False,
                                              download=not args.no_download)
    except DataError as exc:
        log.error("%s", exc)
        return 2
    if args.test_limit:
        test_images, test_labels = test_images[:args.test_limit], test_labels[:args.test_limit]
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    fed = Federation(args, (test_images, test_labels))
    if args.resume:
        try:
            saved = ckpt.load(args.checkpoint)
        except (OSError, ValueError) as exc:
            log.error("cannot resume from %s: %s", args.checkpoint, _one_line(exc))
            return 2
        fed.global_state, fed.history, fed.start_round = saved["model"], ckpt.History(saved["metrics"]), saved["round"]
        ckpt.restore_rng(saved)
        ckpt.rewrite_metrics(args.metrics, fed.history)
        log.info("resumed from %s after round %d", args.checkpoint, fed.start_round)
    else:
        ckpt.rewrite_metrics(args.metrics, [])
    secret = resolve_secret(args.secret)
    try:
        tls = server_tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot load the TLS certificate/key: %s", _one_line(exc))
        return 2
    try:
        server = FLServer((args.host, args.port), fed, args, secret, tls)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc.strerror or exc)
        return 2
    port = server.server_address[1]
    log.info("listening on %s:%d%s; %d rounds, waiting for %d clients", args.host, port,
             " (TLS)" if tls else "", args.rounds, args.min_clients)
    if secret is None:
        log.warning("no shared secret set: any client that can reach this port may join (set --secret or FL_SECRET)")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    def on_signal(signum: int, _frame: Any) -> None:
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        fed.stop.set()
        with fed.lock:
            fed.lock.notify_all()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        return run(fed, args)
    finally:
        server.shutdown()
        server.server_close()


class Evaluator:
    """Evaluate, checkpoint and log finished rounds on a background thread, in order, so
    the next round's training is not held up by the test set."""

    def __init__(self, fed: Federation, args: argparse.Namespace, bar: tqdm) -> None:
        self.fed, self.args, self.bar = fed, args, bar
        self.model = ImprovedCNN()
        self.jobs: "queue.Queue[tuple[RoundState, dict[str, torch.Tensor]] | None]" = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="evaluator", daemon=True)
        self.thread.start()

    def submit(self, rnd: RoundState, state: dict[str, torch.Tensor]) -> None:
        self.jobs.put((rnd, state))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self._finish(*job)
            except Exception:  # a full disk must not kill the federation silently
                log.exception("round %d: could not evaluate/checkpoint", job[0].number)
                self.fed.stop.set()

    def _finish(self, rnd: RoundState, state: dict[str, torch.Tensor]) -> None:
        fed, args = self.fed, self.args
        t0 = time.monotonic()
        self.model.load_state_dict(state)
        loss, accuracy = evaluate(self.model, fed.test_images, fed.test_labels)
        slowest = max((c["train_s"] for c in rnd.clients if c["train_s"] is not None), default=None)
        record = {
            "round": rnd.number, "accuracy": accuracy, "loss": loss, "clients": len(rnd.clients),
            "participants": len(rnd.participants), "bytes_up": rnd.bytes_up, "bytes_down": rnd.bytes_down,
            "round_s": rnd.seconds, "train_s_max": slowest,
            "overhead": rnd.seconds / slowest if slowest else None, "eval_s": time.monotonic() - t0,
            "lr": rnd.lr, "quantized": sum(c["quantized"] for c in rnd.clients),
            "samples": sum(c["samples"] for c in rnd.clients), "time": time.time(),
            "per_client": sorted(rnd.clients, key=lambda c: c["client_id"]),
        }
        fed.history.append(record)
        ckpt.save(args.checkpoint, state, rnd.number, fed.history,
                  {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        ckpt.append_metrics(args.metrics, record)
        log.info("round %d/%d: accuracy %.2f%% loss %.4f | %d clients | up %.2f MB down %.2f MB | %.1f s",
                 rnd.number, args.rounds, 100 * accuracy, loss, record["clients"],
                 rnd.bytes_up / 1e6, rnd.bytes_down / 1e6, rnd.seconds)
        self.bar.set_postfix(acc=f"{accuracy:.2%}", loss=f"{loss:.4f}", clients=record["clients"],
                             MB=f"{sum(m['bytes_up'] + m['bytes_down'] for m in fed.history) / 1e6:.1f}")
        self.bar.update(1)


def run(fed: Federation, args: argparse.Namespace) -> int:
    started = time.monotonic()
    bar = tqdm(total=args.rounds, initial=fed.start_round, desc="rounds", unit="round",
               disable=args.no_progress or args.quiet, dynamic_ncols=True)
    evaluator = Evaluator(fed, args, bar)
    number = fed.start_round + 1
    while number <= args.rounds and not fed.stop.is_set():
        bar.set_description(f"round {number}")
        rnd = fed.run_round(number)
        if rnd is None or fed.stop.is_set():
            log.warning("round %d abandoned; the checkpoint keeps round %d", number, number - 1)
            break
        if len(rnd.clients) < args.min_fit:
            log.warning("round %d: only %d of %d updates (need --min-fit %d); retrying the round",
                        number, len(rnd.clients), len(rnd.participants), args.min_fit)
            continue
        fed.global_state = rnd.accumulator.result()
        evaluator.submit(rnd, fed.global_state)  # overlaps with the next round's training
        number += 1
    evaluator.close()
    bar.close()
    fed.stop_all("federation complete" if number > args.rounds else "server stopping")
    grace = min(args.round_timeout, 30.0)
    if fed.drain(grace):  # else clients mid-round would see a dead server and keep retrying
        log.warning("%d client(s) still busy after %.0f s; closing their connections", len(fed.sessions), grace)
    time.sleep(0.2)  # let the handlers close their sockets after the last DONE
    if not args.quiet:
        print("\nsummary\n" + summary(fed.history, time.monotonic() - started, args), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
