"""Federated-learning client: trains the global model on its own MNIST shard.

Each round the server sends the global model and a training config; the client trains
locally with augmentation and sends back its new weights, or with ``--quantization`` the
difference to the global weights in 8 bits per value (about a quarter of the bytes).
It connects with retry and backoff, so it can be started before the server, and it
reconnects by itself if the server restarts.

    python client.py --client-id 0 --num-clients 3 [--quantization]
"""
from __future__ import annotations

import argparse
import logging
import random
import socket
import ssl
import sys
import time
from typing import Any

import torch

from data import DataError, load_mnist, resolve_data_dir, shard
from layout import Layout
from logs import setup_logging
from model import ImprovedCNN
from protocol import Connection, ConnectionClosed, MsgType, ProtocolError, RemoteError, field
from quantization import QuantizationError, apply_delta, dequantize_state, quantize_state, state_delta
from security import AuthError, CredentialError, client_handshake, client_tls_context, resolve_secret
from training import train

log = logging.getLogger("client")


class Unreachable(Exception):
    """The server could not be reached within the retry window."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Federated-learning client: trains on its MNIST shard, sends updates to the server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    fl.add_argument("--client-id", type=int, default=0, help="this client's index, 0..num-clients-1")
    fl.add_argument("--num-clients", type=int, default=1, help="how many shards the training set is split into")
    fl.add_argument("--partition", choices=("iid", "dirichlet"), default="iid", help="how the shards are drawn")
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
    args = p.parse_args(argv)
    if args.num_clients < 1:
        p.error("--num-clients must be at least 1")
    if not 0 <= args.client_id < args.num_clients:
        p.error(f"--client-id {args.client_id} is out of range for --num-clients {args.num_clients} "
                f"(valid: 0..{args.num_clients - 1})")
    if args.alpha <= 0:
        p.error("--alpha must be positive")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def connect(args: argparse.Namespace, secret: bytes | None, num_samples: int,
            tls: ssl.SSLContext | None) -> Connection:
    """Connect and authenticate, retrying with exponential backoff within the window."""
    deadline = time.monotonic() + args.connect_timeout
    delay, attempt = 0.2, 0
    while True:
        attempt += 1
        try:
            sock = socket.create_connection((args.host, args.port), timeout=10.0)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=args.host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock)
            options = {"quantization": args.quantization, "device": args.device}
            client_handshake(conn, args.client_id, num_samples, options, secret, timeout=30.0)
            return conn
        except (AuthError, ssl.SSLCertVerificationError, RemoteError):
            raise
        except (OSError, ProtocolError) as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unreachable(f"cannot reach the server at {args.host}:{args.port} after {attempt} attempts "
                                  f"in {args.connect_timeout:.0f} s ({exc.__class__.__name__}: {exc})") from None
            if attempt == 1:
                log.info("waiting for the server at %s:%d ...", args.host, args.port)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)


def build_update(model: torch.nn.Module, base: dict[str, torch.Tensor], round_num: int, num_samples: int,
                 result: Any, args: argparse.Namespace, generator: torch.Generator) -> dict[str, Any]:
    local = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metrics = {"loss": result.loss, "accuracy": result.accuracy, "train_s": result.seconds,
               "samples_per_s": result.samples / max(result.seconds, 1e-9)}
    return update_message(local, base, round_num, num_samples, metrics, quantization=args.quantization,
                          stochastic=args.stochastic_rounding, generator=generator)


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


def serve(conn: Connection, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
          args: argparse.Namespace) -> str:
    """Answer MODEL messages with updates until the server says DONE; returns its reason."""
    view: dict[str, torch.Tensor] | None = None  # the last model received (for 8-bit broadcasts)
    view_id = None
    while True:
        msg = conn.recv({MsgType.MODEL, MsgType.DONE})
        if msg.type == MsgType.DONE:
            return str(msg.body.get("reason", "done"))
        round_num = field(msg.body, "round", int)
        config = field(msg.body, "config", dict)
        if "delta" in msg.body:  # the server sent only the 8-bit change to our last model
            if view is None or msg.body.get("base_view") != view_id:
                raise ProtocolError("the server sent a delta to a model this client does not hold")
            base = apply_delta(view, dequantize_state(field(msg.body, "delta", dict), like=view))
        else:
            base = field(msg.body, "state", dict)
        view, view_id = base, msg.body.get("view_id")
        model.load_state_dict(base)
        generator = torch.Generator().manual_seed(args.seed * 100_003 + args.client_id * 1009 + round_num)
        result = train(model, images, labels, epochs=int(config["epochs"]), lr=float(config["lr"]),
                       batch_size=int(config["batch_size"]), generator=generator,
                       augment=bool(config.get("augment", True)), hflip=bool(config.get("hflip", False)),
                       progress=not (args.no_progress or args.quiet), desc=f"round {round_num}")
        body = build_update(model, base, round_num, len(labels), result, args, generator)
        sent = conn.send(MsgType.UPDATE, body)
        log.info("round %d: loss %.4f acc %.2f%% | %.1f s, %.0f img/s | sent %.2f MB%s", round_num,
                 result.loss, 100 * result.accuracy, result.seconds, result.samples / max(result.seconds, 1e-9),
                 sent / 1e6, " (8-bit)" if args.quantization else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    try:
        secret = resolve_secret(args.secret, args.secret_file)
    except CredentialError as exc:
        log.error("%s", exc)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
        images, labels = load_mnist(resolve_data_dir(args.data_dir), train=True, download=not args.no_download)
        idx = shard(labels, args.num_clients, args.client_id, args.partition, args.alpha, args.seed)
    except (DataError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    if args.limit:
        idx = idx[:args.limit]
    images, labels = images[idx].to(device), labels[idx].to(device)
    torch.manual_seed(args.seed + args.client_id)
    random.seed(args.seed + args.client_id)
    try:
        tls = client_tls_context(args.tls_ca) if args.tls_ca else None
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot load --tls-ca %s: %s", args.tls_ca, exc)
        return 2
    model = ImprovedCNN().to(device)
    log.info("client %d of %d: %d samples (%s shard) on %s", args.client_id, args.num_clients,
             len(labels), args.partition, device)
    while True:
        try:
            conn = connect(args, secret, len(labels), tls)
        except Unreachable as exc:
            log.error("%s", exc)
            return 1
        except (AuthError, RemoteError, ssl.SSLError) as exc:
            log.error("refused: %s", exc)
            return 1
        log.info("joined the federation at %s:%d", args.host, args.port)
        try:
            reason = serve(conn, model, images, labels, args)
        except RemoteError as exc:
            log.error("the server refused us: %s", exc)
            return 1
        except (ConnectionClosed, OSError) as exc:
            log.warning("lost the connection to the server (%s); reconnecting", exc)
            continue
        except (ProtocolError, QuantizationError) as exc:
            log.error("protocol error: %s", exc)
            return 1
        finally:
            conn.close()
        log.info("server says: %s; exiting", reason)
        return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
