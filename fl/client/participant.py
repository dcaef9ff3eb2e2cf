"""One federated client's side of the protocol, shared by ``client.py`` (one client per
process) and ``worker.py`` (many virtual clients in one process).

A ``Participant`` connects with retry and backoff, authenticates with
``security.client_handshake``, answers every MODEL with an UPDATE (float or 8-bit) and
reconnects after a lost connection. What the clients of one process share is a ``Host``:
the training images, ONE model, a lock so that they train one after another, and the
last model received (``ViewCache``). Each participant owns only its connection, its
shard's indices and a reference to the model it was last sent, so an idle one costs a
thread blocked in ``poll()`` on its socket: no CPU, a few KB.

A participant reads its MODEL only once it holds the training lock: the frames of the
clients still waiting stay in the socket buffers, so a worker decodes one model at a
time however many of its clients the server sampled.
"""
from __future__ import annotations

import argparse
import logging
import queue
import select
import socket
import ssl
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from fl.client import secagg as secagg_client
from fl.common.layout import Layout
from fl.common.vectors import clip_by_norm
from fl.learning.data import SCHEMES
from fl.learning.model import ImprovedCNN
from fl.learning.quantization import QuantizationError, apply_delta, dequantize_state, quantize_state, state_delta
from fl.learning.training import check_training_config, train
from fl.wire.credentials import resolve_secret
from fl.wire.errors import ConnectionClosed, ProtocolError, RemoteError
from fl.wire.frames import Connection, MsgType, field
from fl.wire.handshake import AuthError, client_handshake
from fl.wire.tls import client_tls_context

log = logging.getLogger("client")
T = TypeVar("T")


class Unreachable(Exception):
    """The server could not be reached within the retry window."""


# --- configuration: built once from the command line ---------------------------------------

def add_client_arguments(p: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """The flags client.py and worker.py share; returns the groups so a caller can add its own."""
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="server address")
    net.add_argument("--port", type=int, default=8080, help="server port")
    secret = net.add_mutually_exclusive_group()
    secret.add_argument("--secret-file", default=None, metavar="PATH",
                        help="file holding this client's secret on one line (default: $FL_SECRET)")
    secret.add_argument("--secret", default=None,
                        help="the secret itself: visible to other users in the process list, "
                             "prefer --secret-file or $FL_SECRET")
    net.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to verify a TLS server; enables TLS")
    net.add_argument("--connect-timeout", type=float, default=120.0,
                     help="seconds to keep retrying to reach the server (at start and after a lost connection)")
    fl = p.add_argument_group("federation")
    fl.add_argument("--num-clients", type=int, default=1, help="how many shards the training set is split into")
    fl.add_argument("--partition", choices=SCHEMES, default="iid",
                    help="how the shards are drawn: IID, label-skewed Dirichlet(alpha), or the FedAvg "
                         "paper's pathological split (sorted by label, two shards per client)")
    fl.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more label skew)")
    fl.add_argument("--quantization", action="store_true", help="send 8-bit quantized updates (about 4x fewer bytes)")
    fl.add_argument("--stochastic-rounding", action="store_true",
                    help="unbiased stochastic rounding for --quantization instead of nearest")
    fl.add_argument("--limit", type=int, default=None, help="train on at most N samples of the shard (quick runs)")
    fl.add_argument("--seed", type=int, default=0, help="seed of the data split (same on all clients) and of training")
    run = p.add_argument_group("compute and output")
    run.add_argument("--data-dir", default=None, help="folder with the MNIST files (default: $MNIST_DATA_DIR or ./data)")
    run.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    run.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return {"network": net, "federation": fl, "run": run}


def check_client_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values of the shared flags with argparse's one-line error (exit 2)."""
    if args.num_clients < 1:
        p.error("--num-clients must be at least 1")
    if args.alpha <= 0:
        p.error("--alpha must be positive")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")


@dataclass(frozen=True)
class ClientConfig:
    """How every participant of a process talks to the server and trains; immutable, so
    one instance is shared by all of them (``dataclasses.replace`` for a variant)."""

    host: str = "127.0.0.1"
    port: int = 8080
    secret: bytes | None = None
    tls: ssl.SSLContext | None = None
    connect_timeout: float = 120.0
    handshake_timeout: float = 30.0
    quantization: bool = False
    stochastic_rounding: bool = False
    seed: int = 0
    device: str = "auto"  # the --device choice, as announced to the server in HELLO
    secagg: bool = True  # announce secure-aggregation support in HELLO (secagg_client.py)
    progress: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ClientConfig":
        """Raises OSError or ssl.SSLError when --tls-ca cannot be loaded, CredentialError
        when --secret-file cannot be read."""
        return cls(host=args.host, port=args.port, secret=resolve_secret(args.secret, args.secret_file),
                   tls=client_tls_context(args.tls_ca) if args.tls_ca else None,
                   connect_timeout=args.connect_timeout, quantization=args.quantization,
                   stochastic_rounding=args.stochastic_rounding, seed=args.seed, device=args.device,
                   progress=not (args.no_progress or args.quiet))


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def round_seed(seed: int, client_id: int, round_num: int) -> int:
    """Seed of one client's training in one round: the same whether the client is a
    process of its own or one of many in a worker, and whatever order a worker trains in."""
    return seed * 100_003 + client_id * 1009 + round_num


def clip_delta(local: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
               clip_norm: float) -> dict[str, torch.Tensor]:
    """``local`` moved back toward ``base`` so the float delta has L2 norm <= ``clip_norm``
    (DP-FedAvg's client-side clipping); integer counters are kept as trained."""
    layout = Layout.of(local)
    floats, ints = layout.flatten(local)
    base_floats, _ = layout.flatten(base)
    delta, _ = clip_by_norm(floats - base_floats, clip_norm)
    return layout.unflatten(base_floats + delta, ints)


# --- what the clients of one process share ---------------------------------------------------

class ViewCache:
    """The clients of one worker are sent the same model each round: keep one copy of it.

    Every participant decodes its own MODEL (each frame is authenticated with its own
    session key), then swaps the result for the copy already held if it is the same view
    with equal tensors, so N idle clients keep one model alive, not N. Equality is checked,
    not assumed from the view id, because a restarted server numbers its views anew."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[Any, dict[str, torch.Tensor]] | None = None

    def share(self, view_id: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._last is not None and self._last[0] == view_id and _same_state(self._last[1], state):
                return self._last[1]
            self._last = (view_id, state)
            return state


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


class Host:
    """The training images, one model, one lock and one training thread, shared by a
    process's participants.

    ``images``/``labels`` are the whole training set (a worker: participants hold indices
    into it) or one client's shard already on its device (client.py). All the tensor work
    runs on the one training thread: oneDNN and the allocators keep per-thread scratch
    buffers (~15 MB a thread here), which would otherwise grow with the number of clients."""

    def __init__(self, images: torch.Tensor | None, labels: torch.Tensor | None, device: torch.device,
                 slots: int = 1) -> None:
        self.images, self.labels = images, labels
        self.device = device
        self.model = ImprovedCNN().to(device) if images is not None else None
        # How many participants may read, train and encode at once: one model here, one
        # per training process in a TrainerPool.
        self.lock = threading.BoundedSemaphore(slots)
        self.views = ViewCache()
        self._jobs: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple]] = queue.SimpleQueue()
        # A daemon thread, so Ctrl-C or a failure ends the process at once rather than
        # after the training under way.
        threading.Thread(target=self._train_loop, name="train", daemon=True).start()

    def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the training thread and return its result (or raise its error)."""
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future.result()

    def fit(self, participant: "Participant", round_num: int, config: dict[str, Any],
            base: dict[str, torch.Tensor]) -> "Fitted":
        """Train ``participant`` from ``base``; called by a participant holding a slot of
        ``lock``. The extension point: ``trainer_pool.TrainerPool`` trains in other processes."""
        return self.compute(fit, self.model, self.images, self.labels, participant.indices, participant.client_id,
                            participant.config.seed, round_num, config, base, participant.config.progress)

    def _train_loop(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting participant
                future.set_exception(exc)
            del future, fn, args  # hold nothing between jobs


# --- one client ------------------------------------------------------------------------------

class _Prefixed(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['prefix']}{msg}", kwargs


class Participant:
    """One client of the federation: its own connection, handshake, shard and seed.

    ``run()`` is the whole life of a client (connect, serve rounds, reconnect after a lost
    connection) and returns an exit status: 0 when the server said DONE, 1 when the server
    is unreachable, refuses us, or breaks the protocol."""

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

    def connect(self) -> Connection:
        """Connect and authenticate, retrying with exponential backoff within the window."""
        cfg = self.config
        deadline = time.monotonic() + cfg.connect_timeout
        delay, attempt = 0.2, 0
        while True:
            attempt += 1
            try:
                sock = socket.create_connection((cfg.host, cfg.port), timeout=10.0)
                if cfg.tls is not None:
                    sock = cfg.tls.wrap_socket(sock, server_hostname=cfg.host)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = Connection(sock)
                options = {"quantization": cfg.quantization, "device": cfg.device, "secagg": cfg.secagg}
                client_handshake(conn, self.client_id, self.num_samples, options, cfg.secret,
                                 timeout=cfg.handshake_timeout)
                return conn
            except (AuthError, ssl.SSLCertVerificationError, RemoteError):
                raise
            except (OSError, ProtocolError) as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unreachable(f"cannot reach the server at {cfg.host}:{cfg.port} after {attempt} attempts "
                                      f"in {cfg.connect_timeout:.0f} s ({exc.__class__.__name__}: {exc})") from None
                if attempt == 1:
                    self.log.info("waiting for the server at %s:%d ...", cfg.host, cfg.port)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 5.0)

    def serve(self, conn: Connection) -> str:
        """Answer MODEL messages with updates until the server says DONE; returns its reason."""
        while True:
            _wait_readable(conn.sock)  # idle: blocked in poll(), no CPU
            secure = None
            with self.host.lock:  # one client of this process at a time reads, trains, encodes
                msg = conn.recv({MsgType.MODEL, MsgType.DONE})
                if msg.type == MsgType.DONE:
                    return str(msg.body.get("reason", "done"))
                round_num = field(msg.body, "round", int)
                if msg.body.get("secagg") is not None:  # the server requires secure aggregation
                    secure = secagg_client.begin(self, conn, round_num, msg.body)
                else:
                    body, result = self._train(round_num, msg.body)
                del msg
            if secure is not None:  # the stages wait for the other clients: not under the lock
                done = secure.run()
                del secure
                if done is not None:
                    return done
                continue
            sent = conn.send(MsgType.UPDATE, body)
            del body  # an idle client holds no update
            self.rounds_trained += 1
            self.log.info("round %d: loss %.4f acc %.2f%% | %.1f s, %.0f img/s | sent %.2f MB%s", round_num,
                          result.loss, 100 * result.accuracy, result.seconds,
                          result.samples / max(result.seconds, 1e-9), sent / 1e6,
                          " (8-bit)" if self.config.quantization else "")

    def _train(self, round_num: int, model_msg: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Train from the model we were sent; the UPDATE body. Called while the participant
        holds a slot of the host's lock; the tensor work runs on the host's training thread."""
        config = self.training_config(model_msg)
        base = self.host.compute(self._base, model_msg)
        fitted = self.host.fit(self, round_num, config, base)
        return self.host.compute(self._encode, round_num, config, base, fitted)

    @staticmethod
    def training_config(model_msg: dict[str, Any]) -> dict[str, Any]:
        """The MODEL's training config, checked before any training: ProtocolError, one line,
        for a value this client cannot train with."""
        config = field(model_msg, "config", dict)
        try:
            check_training_config(config)
        except ValueError as exc:
            raise ProtocolError(f"unusable training config: {exc}") from None
        return config

    def _encode(self, round_num: int, config: dict[str, Any], base: dict[str, torch.Tensor],
                fitted: "Fitted") -> tuple[dict[str, Any], Any]:
        local, result, generator, num_samples = fitted
        quantization = self.config.quantization
        if "dp_clip_norm" in config:  # client-side DP clipping: our raw delta never leaves us
            local = clip_delta(local, base, float(config["dp_clip_norm"]))
            quantization = False  # 8-bit rounding could push the norm past the bound the server checks
        # Built under the lock: the flat vector and the 8-bit delta are copies, so the next
        # client may overwrite the model while this one's update is being sent.
        body = update_message(local, base, round_num, num_samples, train_metrics(result),
                              quantization=quantization, stochastic=self.config.stochastic_rounding,
                              generator=generator)
        return body, result

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


Fitted = tuple[dict[str, torch.Tensor], Any, torch.Generator, int]  # local state, TrainResult, generator, samples


def fit(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None,
        client_id: int, seed: int, round_num: int, config: dict[str, Any], base: dict[str, torch.Tensor],
        progress: bool = False) -> Fitted:
    """One client's local training from ``base``: (a copy of the local state, the training
    result, the round's generator, the sample count). Seeded from (seed, client id, round)
    alone, so the same client trains identically in any process and in any order."""
    model.load_state_dict(base)
    rs = round_seed(seed, client_id, round_num)
    generator = torch.Generator().manual_seed(rs)
    torch.manual_seed(rs + 1_000_000_007)  # dropout draws from the global generator
    if indices is not None:
        images, labels = images[indices], labels[indices]
    result = train(model, images, labels, epochs=int(config["epochs"]), lr=float(config["lr"]),
                   batch_size=int(config["batch_size"]), generator=generator,
                   augment=bool(config.get("augment", True)), hflip=bool(config.get("hflip", False)),
                   progress=progress, desc=f"round {round_num}",
                   mu=float(config.get("mu", 0.0)),  # FedProx's proximal term, when asked for
                   optimizer=str(config.get("optimizer", "adam")), momentum=float(config.get("momentum", 0.0)),
                   freeze_bn=bool(config.get("freeze_bn", False)))
    # A copy even on the CPU (where .cpu() would alias the model's own tensors): the next
    # client trained on this model must not change what this one returns.
    local = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return local, result, generator, len(labels)


def train_metrics(result: Any) -> dict[str, float]:
    return {"loss": result.loss, "accuracy": result.accuracy, "train_s": result.seconds,
            "samples_per_s": result.samples / max(result.seconds, 1e-9)}


def update_message(local: dict[str, torch.Tensor], base: dict[str, torch.Tensor], round_num: int,
                   num_samples: int, metrics: dict[str, Any], *, quantization: bool = False,
                   stochastic: bool = False, generator: torch.Generator | None = None) -> dict[str, Any]:
    """The UPDATE body: the new weights in flat form (``layout.py``: a state_dict costs the
    server ~4x more to decode), or the 8-bit quantized difference to the model we were sent."""
    body: dict[str, Any] = {"round": round_num, "num_samples": num_samples, "metrics": metrics,
                            "quantized": quantization}
    if quantization:
        body["delta"] = quantize_state(state_delta(local, base), stochastic=stochastic, generator=generator)
    else:
        body["flat"] = Layout.of(local).pack(local)
    return body


def _wait_readable(sock: socket.socket) -> None:
    """Block until the server has sent something or hung up, reading nothing. poll(), not
    select(): a worker's descriptors may be numbered past select's limit of 1024."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    while not poller.poll():
        pass
