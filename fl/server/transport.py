"""TCP transport: accept, authenticate, and serve each client on its own thread.

In the manner of ``socketserver``: :class:`FLServer` accepts connections and gives each a
:class:`ClientHandler` thread, which runs the handshake and then serves the rounds the
:class:`federation.Federation` queues to its session (send MODEL, receive UPDATE into an
ingest buffer, hand it to the ingest thread). Extension points: ``FLServer.admit`` (who may
start a handshake), ``ClientHandler.authenticate`` and ``ClientHandler.serve_round``.

Bounded work per peer: connections still in their handshake are capped in total and per
address, and time out; sessions get slots of their own (``--max-connections``), so idle
unauthenticated sockets cannot lock honest clients out; refusals are logged as counts per
interval, not a line each.
"""
from __future__ import annotations

import collections
import logging
import queue
import socket
import socketserver
import ssl
import threading
import time
from typing import Any

from fl.common.limits import malloc_trim
from fl.common.logs import sanitize
from fl.server.config import ServerConfig
from fl.server.federation import Federation, RoundTask, Session, Stop
from fl.server.ingest import Ingest
from fl.wire.credentials import KeyRing
from fl.wire.errors import ProtocolError
from fl.wire.frames import MIB, Connection, MsgType, frame_limit, readable, wait_readable
from fl.wire.handshake import AuthError, server_handshake
from fl.wire.safe_decode import Limits

log = logging.getLogger("server")
INGEST_WAIT_S = 2.0  # longest a handler waits for a receive buffer before reading into new memory
INGEST_SLOTS = 2  # receive buffers: one update read from its socket while another is decoded
IDLE_CHECK_S = 1.0  # how often an idle session looks whether its peer hung up
STOP_CHECK_S = 1.0  # how often a session waiting for an update looks whether the federation ended
LINGER_S = 2.0  # how long a session told DONE mid-task reads what its client was already sending
TRIM_INTERVAL_S = 1.0  # at most one malloc_trim a second, however many frames are refused


class RefusalLog:
    """Counts refused connections and logs them as one line per interval, so a flood of
    hostile connections cannot flood the log: the first refusal after a quiet interval is
    logged at once, later ones are added up and logged by ``tick`` (called by the server
    loop a few times a second) once the interval has passed, or by ``flush`` at exit."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.last = time.monotonic() - interval  # nothing logged yet: the first refusal shows at once

    def count(self, reason: str) -> None:
        with self.lock:
            self.counts[reason] += 1
        self.tick()

    def tick(self) -> None:
        """Log what was counted, if the last line is at least ``interval`` old."""
        with self.lock:
            now = time.monotonic()
            if not self.counts or now - self.last < self.interval:
                return
            counts, self.counts = self.counts, collections.Counter()
            self.last = now
        self._log(counts)

    def flush(self) -> None:
        with self.lock:
            counts, self.counts = self.counts, collections.Counter()
        if counts:
            self._log(counts)

    @staticmethod
    def _log(counts: "collections.Counter[str]") -> None:
        log.warning("refused %d connection(s): %s", sum(counts.values()),
                    "; ".join(f"{n} {why}" for why, n in counts.most_common(5)))


class ClientHandler(socketserver.BaseRequestHandler):
    """One client connection: handshake, then rounds until told to stop."""

    server: "FLServer"

    def setup(self) -> None:
        self.host = str(self.client_address[0])
        self.address = "%s:%s" % self.client_address[:2]

    def handle(self) -> None:
        srv = self.server
        try:
            conn, session = self.authenticate()
        except AuthError:
            srv.refusals.count("failed authentication")
            return
        except (ProtocolError, OSError, ssl.SSLError, ValueError) as exc:
            srv.refusals.count(f"failed handshake ({type(exc).__name__})")
            log.debug("dropped %s during handshake: %s", self.address, sanitize(str(exc)))
            return
        finally:
            srv.end_pending(self.host)
        if session.peer.joining:  # told its id and the split; its session comes on a connection of its own
            conn.close()
            return
        if not srv.sessions.acquire(blocking=False):
            conn.send_error("server full")
            conn.close()
            srv.refusals.count("server full (--max-connections)")
            return
        fed = srv.federation
        try:
            fed.register(session)
            peer = session.peer
            about = ([] if srv.config.dp else [f"{peer.num_samples} samples"]) + \
                (["quantized updates"] if peer.options.get("quantization") else [])  # DP: no client's sample count
            (log.info if len(fed.sessions) <= 10 else log.debug)(
                "client %d joined from %s%s", peer.client_id, self.address, f" ({', '.join(about)})" if about else "")
            self.serve(session, conn)
        finally:
            fed.unregister(session)
            conn.close()
            srv.sessions.release()

    def authenticate(self) -> tuple[Connection, Session]:
        cfg = self.server.config
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(cfg.handshake_timeout)
        end = time.monotonic() + cfg.handshake_timeout  # one budget for TLS and authentication
        if self.server.tls is not None:
            sock = self.server.tls.wrap_socket(sock, server_side=True)
        conn = Connection(sock, max_frame=max(cfg.max_frame_mb * MIB, self.server.max_frame), limits=self.server.limits)
        try:
            peer = server_handshake(conn, self.server.keyring, timeout=max(0.01, end - time.monotonic()),
                                    join=self.server.federation.join)
            if not peer.joining and not 1 <= peer.num_samples <= cfg.max_samples:
                conn.send_error(f"sample count {peer.num_samples} outside 1..{cfg.max_samples} (--max-samples)")
                raise ProtocolError(f"client {peer.client_id} claims {peer.num_samples} samples")
        except BaseException:
            conn.close()
            raise
        return conn, Session(peer, self.address, hang_up=conn.close)

    def serve(self, session: Session, conn: Connection) -> None:
        fed = self.server.federation
        while True:
            try:
                task = session.tasks.get(timeout=IDLE_CHECK_S)
            except queue.Empty:
                if not fed.is_current(session):
                    return  # dropped at a round deadline (or replaced): it will reconnect
                if _hung_up(conn.sock):  # an idle client that is gone must not count as connected
                    log.debug("client %d left (%s)", session.client_id, session.address)
                    return
                continue
            if isinstance(task, Stop):
                try:
                    conn.send(MsgType.DONE, {"reason": task.reason}, timeout=5.0)
                except (OSError, ProtocolError):
                    pass
                return
            received = conn.bytes_received
            ok = self.serve_round(session, conn, task)
            if not ok or conn.bytes_received - received > self.server.slot_size:
                # A refused update, or one too big for an ingest buffer, was read into memory of
                # its own (growing by steps, so fragmented): malloc keeps such pages unless asked.
                self.server.release_memory_soon()
            if not ok:
                return
            del task  # nor this round's MODEL payload

    def serve_round(self, session: Session, conn: Connection, task: RoundTask) -> bool:
        """Send the model, receive the update, hand it to the ingest thread; False ends the session."""
        fed, ingest = self.server.federation, self.server.ingest
        sent0, recv0 = conn.bytes_sent, conn.bytes_received
        try:
            send_model(conn, session, task, task.deadline)
            if not self.await_update(session, conn, task):
                return False
            # At most INGEST_SLOTS updates in memory, so N clients cost a few models, not N;
            # a peer that uploads slowly holds the others up for at most INGEST_WAIT_S.
            buffer = ingest.buffer(timeout=INGEST_WAIT_S)
            try:
                frame = conn.recv_frame(MsgType.UPDATE, timeout=max(0.1, task.deadline - time.monotonic()),
                                        buffer=buffer)
                ingest.process(session, task, frame.payload, conn.bytes_received - recv0, conn.bytes_sent - sent0)
                del frame  # nor the update while this client trains for the next round
            finally:
                if buffer is not None:
                    ingest.give_back(buffer)
        except (ProtocolError, OSError, ssl.SSLError) as exc:
            fed.fail(session, task.round, conn.bytes_sent - sent0, f"{type(exc).__name__}: {exc}")
            return False
        return True

    def await_update(self, session: Session, conn: Connection, task: RoundTask) -> bool:
        """Wait while the client trains, holding no slot; False if the federation ended
        meanwhile (an asynchronous run's last step, a stop): the client is told DONE now
        rather than after its update, which nobody would use, and an update it was already
        sending is read and dropped, so closing does not reset the connection under it."""
        while not wait_readable(conn.sock, min(task.deadline, time.monotonic() + STOP_CHECK_S)):
            if session.stopping is not None:
                try:
                    conn.send(MsgType.DONE, {"reason": session.stopping}, timeout=5.0)
                    if wait_readable(conn.sock, time.monotonic() + LINGER_S):
                        conn.recv_frame(MsgType.UPDATE, timeout=LINGER_S)
                except (OSError, ProtocolError, ssl.SSLError):
                    pass
                return False
            if time.monotonic() >= task.deadline:
                break  # the read that follows times out and reports it
        return True


def send_model(conn: Connection, session: Session, task: RoundTask, deadline: float) -> None:
    """The round's MODEL: the 8-bit delta when the client holds the broadcast it is measured
    from (--quantize-broadcast), else the full state; the client then holds this one."""
    delta_ok = task.compact is not None and session.view_id == task.view_id - 1
    conn.send_payload(MsgType.MODEL, task.compact if delta_ok else task.payload,
                      timeout=max(1.0, deadline - time.monotonic()))
    session.view_id = task.view_id


class FLServer(socketserver.ThreadingTCPServer):
    handler_class: type[ClientHandler] = ClientHandler  # a subclass may serve rounds differently
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # a burst of 1,000 virtual clients joining at once

    def __init__(self, config: ServerConfig, federation: Federation, keyring: KeyRing,
                 tls: ssl.SSLContext | None) -> None:
        self.config = config
        self.federation = federation
        self.keyring = keyring
        self.tls = tls
        layout = federation.layout  # a float update's frame is this plus a little metadata
        self.slot_size = 4 * layout.float_numel + 8 * layout.int_numel + 64 * 1024
        self.limits, self.max_frame = Limits.of(layout), frame_limit(layout)  # the strict ones for the default model
        self.ingest = Ingest(federation.submit, INGEST_SLOTS, self.slot_size, self.limits)
        self.trim_due = False
        self.trimmed_at = 0.0
        self.sessions = threading.BoundedSemaphore(config.max_connections)
        self.pending: collections.Counter[str] = collections.Counter()
        self.pending_lock = threading.Lock()
        self.refusals = RefusalLog()
        super().__init__((config.host, config.port), self.handler_class)

    def admit(self, host: str) -> str | None:
        """Reserve a handshake slot for ``host``; the reason it is refused, or None."""
        cfg = self.config
        with self.pending_lock:
            if sum(self.pending.values()) >= cfg.max_pending:
                return "too many handshakes in progress (--max-pending)"
            if self.pending[host] >= cfg.max_pending_per_address:
                return "too many handshakes from one address (--max-pending-per-address)"
            self.pending[host] += 1
        return None

    def end_pending(self, host: str) -> None:
        with self.pending_lock:
            self.pending[host] -= 1
            if self.pending[host] <= 0:
                del self.pending[host]

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        refused = self.admit(str(client_address[0]))
        if refused is not None:
            self.refusals.count(refused)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: give the slot back
            self.end_pending(str(client_address[0]))
            raise

    def release_memory_soon(self) -> None:
        """Ask the server loop to hand freed heap memory back to the kernel (``malloc_trim``)."""
        self.trim_due = True

    def service_actions(self) -> None:
        super().service_actions()
        self.refusals.tick()  # a burst of refusals is logged within an interval, not only at exit
        if self.trim_due and time.monotonic() - self.trimmed_at >= TRIM_INTERVAL_S:
            self.trim_due = False
            self.trimmed_at = time.monotonic()
            malloc_trim()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unexpected error serving %s", client_address)


def _hung_up(sock: socket.socket) -> bool:
    """Whether an idle peer has closed its end. Peeks at the raw socket, so nothing is
    consumed (under TLS too: ``socket.socket.recv`` bypasses the SSL layer)."""
    try:
        if not readable(sock, 0.0):
            return False
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):  # reset, or already closed here
        return True
