"""One federated client's side of the protocol, shared by ``client.py`` (one client per
process) and ``worker.py`` (many virtual clients in one process).

A client started without an id first asks the server for one and for the run's data
split (``join``). A ``Participant`` connects with retry and backoff, authenticates with
``fl.wire.handshake.client_handshake``, answers every MODEL with an UPDATE (float or 8-bit) and
reconnects after a lost connection. What the clients of one process share is a ``Host``
(``host.py``); its local training is ``local.fit`` and the UPDATE body is made by a chain
of ``steps``. Each participant owns only its connection, its shard's indices and a
reference to the model it was last sent, so an idle one costs a thread blocked in
``poll()`` on its socket: no CPU, a few KB.

A participant reads its MODEL only once it holds the training lock: the frames of the
clients still waiting stay in the socket buffers, so a worker decodes one model at a
time however many of its clients the server sampled.
"""
from __future__ import annotations

import functools
import logging
import socket
import ssl
import time
from typing import Any, Sequence

import torch

from fl.client import secagg as secagg_client
from fl.client import steps
from fl.client.config import ClientConfig
from fl.client.host import Host
from fl.client.local import Fitted, log_round, straggle_seconds, train_metrics
from fl.common.layout import Layout
from fl.learning.config import Split, TrainingConfig
from fl.learning.quantization import QuantizationError, apply_delta, dequantize_state
from fl.wire.errors import ConnectionClosed, ProtocolError, RemoteError
from fl.wire.frames import Connection, MsgType, field, frame_limit, wait_readable
from fl.wire.handshake import AuthError, BadWelcome, Mismatch, Terms, client_handshake
from fl.wire.safe_decode import Limits

log = logging.getLogger("client")


class Unreachable(Exception):
    """The server could not be reached within the retry window."""


class _Prefixed(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['prefix']}{msg}", kwargs


def _wait_for_server(conn: Connection, seconds: float) -> bool:
    """Sleep ``seconds`` unless the server sends something first (True then)."""
    return wait_readable(conn.sock, time.monotonic() + seconds)


class Participant:
    """One client of the federation: its own connection, handshake, shard and seed.

    ``run()`` is the whole life of a client (connect, serve rounds, reconnect after a lost
    connection) and returns an exit status: 0 when the server said DONE, 1 when the server
    is unreachable, refuses us, or breaks the protocol; 2 when it trains another model or
    dataset than this client's host (told in WELCOME, before any training)."""

    def __init__(self, client_id: int, host: Host, config: ClientConfig,
                 indices: torch.Tensor | None = None, log_prefix: str = "") -> None:
        self.client_id = client_id
        self.host = host
        self.config = config
        self.indices = indices  # None: all of the host's data is this client's shard
        self.num_samples = len(indices) if indices is not None else len(host.labels)
        self.log = _Prefixed(log, {"prefix": log_prefix})
        self.view: dict[str, torch.Tensor] | None = None  # the last model received (for 8-bit broadcasts)
        self.view_id: Any = None
        self.rounds_trained = 0
        self._secagg_warned = False  # the note that secure aggregation overrides --quantization
        self.wait = _wait_for_server  # how a slow client (--speed) waits; a test injects its own

    def connect(self) -> Connection:
        """Connect and authenticate with this client's id, retrying within the window;
        Mismatch when the server trains another model or dataset than the host's."""
        return connect(self.config, self.client_id, self.num_samples, self.log, terms=self.host.terms,
                       layout=self.host.layout)[0]

    def serve(self, conn: Connection) -> str:
        """Answer MODEL messages with updates until the server says DONE; returns its reason."""
        while True:
            wait_readable(conn.sock)  # idle: blocked in poll(), no CPU
            with self.host.lock:  # one client of this process at a time reads, trains, encodes
                msg = conn.recv({MsgType.MODEL, MsgType.DONE})
                if msg.type == MsgType.DONE:
                    return str(msg.body.get("reason", "done"))
                round_num = field(msg.body, "round", int)
                secure = self._begin(conn, round_num, msg.body)
                if secure is None:
                    body, result = self._train(round_num, msg.body)
                del msg
            if secure is not None:  # the stages wait for the other clients: not under the lock
                done = secure.run()
                self.rounds_trained += secure.result is not None
                del secure
                if done is not None:
                    return done
                continue
            slept, done = self._straggle(conn, result)  # not under the lock: the host's others keep training
            if done is not None:
                self.log.info("round %d: trained, but the federation ended meanwhile: update not sent", round_num)
                return done
            sent = conn.send(MsgType.UPDATE, body)
            del body  # an idle client holds no update
            self.rounds_trained += 1
            log_round(self.log, round_num, result,
                      f"sent {sent / 1e6:.2f} MB" + (" (8-bit)" if self.config.quantization else "")
                      + (f" after sleeping {slept:.3f} s (--speed {self.config.speed:g})" if slept else ""))

    def _train(self, round_num: int, model_msg: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Train from the model we were sent; the UPDATE body. Called while the participant
        holds a slot of the host's lock; the tensor work runs on the host's training thread."""
        training = self.training_config(model_msg)
        base = self.host.compute(self._base, model_msg)
        return self._update(round_num, training, base, self.update_steps(training))

    def _begin(self, conn: Connection, round_num: int,
               model_msg: dict[str, Any]) -> secagg_client.SecAggSession | None:
        """The round's secure-aggregation session when the server requires one, else None."""
        if model_msg.get("secagg") is None:
            return None
        settings = secagg_client.settings_of(model_msg, round_num)
        training = self.training_config(model_msg)
        base = self.host.compute(self._base, model_msg)
        if self.config.quantization and not self._secagg_warned:
            self._secagg_warned = True
            self.log.warning("%s", secagg_client.QUANTIZATION_WARNING)
        train = functools.partial(self._update_locked, round_num, training, base, attempt=settings.attempt)
        return secagg_client.begin(conn, settings, training, base, client_id=self.client_id, train=train,
                                   log=self.log)

    def update_steps(self, training: TrainingConfig) -> list[steps.Step]:
        """The chain that turns this client's trained model into a plain round's UPDATE body."""
        return steps.plain_steps(self.config.quantization, self.config.stochastic_rounding, training.dp_clip_norm)

    @staticmethod
    def training_config(model_msg: dict[str, Any]) -> TrainingConfig:
        """The MODEL's training config, checked before any training: ProtocolError, one line,
        for a value this client cannot train with."""
        wire = field(model_msg, "config", dict)
        try:
            return TrainingConfig.from_wire(wire)
        except ValueError as exc:
            raise ProtocolError(f"unusable training config: {exc}") from None

    def _update(self, round_num: int, training: TrainingConfig, base: dict[str, torch.Tensor],
                chain: Sequence[steps.Step], attempt: int = 0) -> tuple[dict[str, Any], Any]:
        """Train, then run ``chain`` on the training thread: (UPDATE body, training result).
        The caller holds a slot of the host's lock; ``attempt``: a retried secure round's."""
        fitted = self.host.fit(self, round_num, training, base, attempt)
        return self.host.compute(_encode, round_num, base, fitted, chain)

    def _update_locked(self, round_num: int, training: TrainingConfig, base: dict[str, torch.Tensor],
                       chain: Sequence[steps.Step], attempt: int = 0) -> tuple[dict[str, Any], Any]:
        """``_update`` taking a slot of the host's lock: as many clients of this process
        train at once as it has models (secure aggregation's callback)."""
        with self.host.lock:
            body, result = self._update(round_num, training, base, chain, attempt)
        time.sleep(straggle_seconds(self.config.speed, result.seconds))  # the stages that follow need it
        return body, result

    def _straggle(self, conn: Connection, result: Any) -> tuple[float, str | None]:
        """A client slower by ``--speed`` s: wait (s-1) x its measured training time, holding
        no slot of the host's lock. A DONE from the server ends the wait (and any client's,
        before it sends): the federation ended while it trained. (Seconds waited, DONE's
        reason or None.)"""
        wait = straggle_seconds(self.config.speed, result.seconds)
        start = time.monotonic()
        if not self.wait(conn, wait):
            return wait, None
        msg = conn.recv(MsgType.DONE, timeout=10.0)  # mid-task the server sends nothing else
        return time.monotonic() - start, str(msg.body.get("reason", "done"))

    def _base(self, model_msg: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The model the server sent (rebuilt from an 8-bit delta to our last one), shared
        with the host's other clients when equal; on the training thread."""
        if "delta" in model_msg:  # the server sent only the 8-bit change to our last model
            if self.view is None or model_msg.get("base_view") != self.view_id:
                raise ProtocolError("the server sent a delta to a model this client does not hold")
            base = apply_delta(self.view, dequantize_state(field(model_msg, "delta", dict), like=self.view))
        else:
            base = field(model_msg, "state", dict)
        self.view_id = model_msg.get("view_id")
        self.view = base = self.host.views.share(self.view_id, base)
        return base

    def run(self) -> int:
        """Connect, serve rounds, reconnect after a lost connection; the exit status."""
        cfg = self.config
        while True:
            try:
                conn = self.connect()
            except Unreachable as exc:
                self.log.error("%s", exc)
                return 1
            except (AuthError, RemoteError, ssl.SSLError) as exc:
                self.log.error("refused: %s", exc)
                return 1
            except BadWelcome as exc:
                self.log.error("protocol error: %s", exc)
                return 1
            except Mismatch as exc:  # a setting to change, before any training
                self.log.error("%s", exc)
                return 2
            self.log.info("joined the federation at %s:%d", cfg.host, cfg.port)
            try:
                reason = self.serve(conn)
            except RemoteError as exc:
                self.log.error("the server refused us: %s", exc)
                return 1
            except (ConnectionClosed, OSError) as exc:
                self.log.warning("lost the connection to the server (%s); reconnecting", exc)
                continue
            except (ProtocolError, QuantizationError) as exc:
                self.log.error("protocol error: %s", exc)
                return 1
            finally:
                conn.close()
            self.log.info("server says: %s; exiting", reason)
            return 0


def connect(cfg: ClientConfig, client_id: int | None, num_samples: int, log: Any, join: bool = False,
            terms: Terms | None = None, layout: Layout | None = None) -> tuple[Connection, dict[str, Any]]:
    """Connect and authenticate, retrying with exponential backoff within the window; the
    connection and WELCOME's fields. A refusal, a bad WELCOME or one whose terms differ
    from ``terms`` (Mismatch) is final: no retry. ``layout`` sizes the frames and payloads
    the connection accepts (the strict limits without one)."""
    deadline = time.monotonic() + cfg.connect_timeout
    delay, attempt = 0.2, 0
    options = {"quantization": cfg.quantization, "device": cfg.device, "secagg": cfg.secagg}
    while True:
        attempt += 1
        sock = None
        try:
            sock = socket.create_connection((cfg.host, cfg.port), timeout=10.0)
            if cfg.tls is not None:
                sock = cfg.tls.wrap_socket(sock, server_hostname=cfg.host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock) if layout is None else Connection(sock, frame_limit(layout), Limits.of(layout))
            welcome = client_handshake(conn, client_id, num_samples, options, cfg.secret,
                                       timeout=cfg.handshake_timeout, join=join)
            if terms is not None:
                terms.check(Terms.of(welcome))
            return conn, welcome
        except (AuthError, BadWelcome, Mismatch, ssl.SSLCertVerificationError, RemoteError):
            _close(sock)
            raise
        except (OSError, ProtocolError) as exc:
            _close(sock)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unreachable(f"cannot reach the server at {cfg.host}:{cfg.port} after {attempt} attempts "
                                  f"in {cfg.connect_timeout:.0f} s ({exc.__class__.__name__}: {exc})") from None
            if attempt == 1:
                log.info("waiting for the server at %s:%d ...", cfg.host, cfg.port)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)


def join(cfg: ClientConfig, client_id: int | None, log: Any = log) -> tuple[int, Split, Terms | None]:
    """Ask the server for this client's shard: its id (the lowest free one when
    ``client_id`` is None; the server checks a given one against its shards), the split
    of the run and what it trains (None from a server that does not say), on one short connection. The session follows with that id (``Participant``),
    and so does every reconnection: a client keeps its shard. Raises what ``connect`` does
    (Unreachable, AuthError, RemoteError when refused, BadWelcome)."""
    conn, welcome = connect(cfg, client_id, 0, log, join=True)
    conn.close()
    if "split" not in welcome or "client_id" not in welcome:
        raise BadWelcome("the server did not send this client's shard: it may predate joining without "
                         "--client-id; pass --client-id and --num-clients")
    try:
        split = Split.from_wire(welcome["split"])
    except ValueError as exc:
        raise BadWelcome(f"the server's split is unusable: {exc}") from None
    cid = welcome["client_id"]
    if (client_id is not None and cid != client_id) or not cid < split.num_shards:
        raise BadWelcome(f"the server gave client id {cid} (asked: {client_id}) of {split.num_shards} shards")
    return cid, split, Terms.of(welcome)


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


def _encode(round_num: int, base: dict[str, torch.Tensor], fitted: Fitted,
            chain: Sequence[steps.Step]) -> tuple[dict[str, Any], Any]:
    """The UPDATE body ``chain`` makes of a trained model. Built under the lock: the flat
    vector and the 8-bit delta are copies, so the next client may overwrite the model while
    this one's update is being sent."""
    local, result, generator, num_samples = fitted
    update = steps.Update(round_num, local, base, num_samples, train_metrics(result), generator)
    del fitted, local
    return steps.run_steps(chain, update), result
