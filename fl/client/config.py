"""A client process's settings, built once from the command line: the flags ``client.py``
and ``worker.py`` share, their checks, and the frozen ``ClientConfig`` every participant
of the process reads."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import ssl
from dataclasses import dataclass

import torch

from fl.common.cli import HelpFormatter, add_secret_arguments
from fl.learning.config import DATASETS, SCHEMES, Split
from fl.learning.models import BUILTIN as BUILTIN_MODELS
from fl.wire.credentials import resolve_secret
from fl.wire.tls import client_tls_context

# The data split as a client's own flags, by the Split field each sets.
SPLIT_FLAGS = {"num_shards": "--num-clients", "scheme": "--partition", "alpha": "--alpha", "seed": "--seed"}


def client_parser(description: str, server_split: bool = False,
                  ) -> tuple[argparse.ArgumentParser, dict[str, argparse._ArgumentGroup]]:
    """A parser with the shared flags, and their groups for a command to add its own to.
    ``server_split``: the split flags default to None, the server's (client.py)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    return p, add_client_arguments(p, server_split)


def add_client_arguments(p: argparse.ArgumentParser, server_split: bool = False) -> dict[str, argparse._ArgumentGroup]:
    """The flags client.py and worker.py share; returns the groups so a caller can add its own."""
    d = ClientConfig()
    own = dataclasses.asdict(Split()) if not server_split else dict.fromkeys([*SPLIT_FLAGS, "dataset", "test_fraction"])
    theirs = " (with --client-id; default: the server's)" if server_split else ""
    net = p.add_argument_group("network")
    net.add_argument("--host", default=d.host, help="server address")
    net.add_argument("--port", type=int, default=d.port, help="server port")
    add_secret_arguments(net, "this client's secret on one line", "")
    net.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to verify a TLS server; enables TLS")
    net.add_argument("--connect-timeout", type=float, default=d.connect_timeout,
                     help="seconds to keep retrying to reach the server (at start and after a lost connection)")
    fl = p.add_argument_group("federation")
    fl.add_argument("--num-clients", type=int, default=own["num_shards"],
                    help="how many shards the training set is split into" + theirs)
    fl.add_argument("--partition", choices=SCHEMES, default=own["scheme"],
                    help="how the shards are drawn: IID, label-skewed Dirichlet(alpha), or the FedAvg "
                         "paper's pathological split (sorted by label, two shards per client)" + theirs)
    fl.add_argument("--alpha", type=float, default=own["alpha"],
                    help="Dirichlet concentration (smaller = more label skew)" + theirs)
    fl.add_argument("--quantization", action="store_true", help="send 8-bit quantized updates (about 4x fewer bytes)")
    fl.add_argument("--stochastic-rounding", action="store_true",
                    help="unbiased stochastic rounding for --quantization instead of nearest")
    fl.add_argument("--limit", type=int, default=None, help="train on at most N samples of the shard (quick runs)")
    fl.add_argument("--seed", type=int, default=own["seed"],
                    help="seed of the data split (same on all clients) and of training" + theirs)
    fl.add_argument("--dataset", choices=DATASETS, default=own["dataset"], metavar="NAME",
                    help="what to train on: " + ", ".join(DATASETS) + (" (default: the server's; another than "
                         "the server's is refused)" if server_split else "") + "; folder: --data-dir holds one "
                         "subfolder of images per class (or train/ and test/ holding those), made 1-channel 28x28")
    fl.add_argument("--model", default=None, metavar="NAME",
                    help="the model trained: " + ", ".join(BUILTIN_MODELS) + " or package.module:factory; must be the "
                         "server's (checked when joining: another is refused, exit 2)" + (
                             " (default: the server's when a built-in, else improved-cnn)" if server_split
                             else " (default: improved-cnn)"))
    fl.add_argument("--test-fraction", type=float, default=own["test_fraction"],
                    help="--dataset folder without train/ and test/: the share held out for the server's tests"
                         + (" (with --num-clients; default: the server's)" if server_split else ""))
    run = p.add_argument_group("compute and output")
    run.add_argument("--data-dir", default=None,
                     help="folder with the --dataset files (default: $MNIST_DATA_DIR or ./data)")
    run.add_argument("--no-download", action="store_true", help="never try to download the --dataset files")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="where to train")
    run.add_argument("--speed", type=float, default=d.speed, metavar="FACTOR",
                     help="slowdown factor >= 1 (a straggler): after each local training, sleep FACTOR-1 times "
                          "the measured training time before sending, so training takes FACTOR times as long in "
                          "real time while the cores stay free for other clients")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    run.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return {"network": net, "federation": fl, "run": run}


def check_client_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values of the shared flags with argparse's one-line error (exit 2)."""
    if args.num_clients is not None and args.num_clients < 1:
        p.error("--num-clients must be at least 1")
    if args.alpha is not None and not args.alpha > 0:
        p.error("--alpha must be positive")
    if args.test_fraction is not None and not 0 < args.test_fraction < 1:
        p.error("--test-fraction must be in (0, 1)")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if not valid_speed(args.speed):
        p.error(f"--speed must be a finite factor >= 1, got {args.speed}")


def valid_speed(factor: object) -> bool:
    """A slowdown factor: a finite number >= 1 (1: full speed)."""
    return isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor) and factor >= 1


def read_speeds(path: str) -> dict[int, float]:
    """Per-client slowdown factors from a run's speeds.json (``simulate.py --client-speeds``
    writes it): its ``speeds`` object, client id -> factor. ValueError, one line, if unusable."""
    try:
        with open(path) as f:
            speeds = json.load(f)["speeds"]
        out = {int(cid): factor for cid, factor in speeds.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--speeds {path}: not a speeds file with a 'speeds' object of client id -> factor "
                         f"({exc.__class__.__name__}: {exc})") from None
    bad = next((cid for cid, factor in out.items() if cid < 0 or not valid_speed(factor)), None)
    if bad is not None:
        raise ValueError(f"--speeds {path}: client {bad}: a factor must be a finite number >= 1, got {out[bad]!r}")
    return {cid: float(factor) for cid, factor in out.items()}


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
    seed: int = Split.seed  # of training (and of the split, for a client with its own)
    model: str | None = None  # --model (learning/models/); None: the server's built-in, else the default
    device: str = "auto"  # the --device choice, as announced to the server in HELLO
    secagg: bool = True  # announce secure-aggregation support in HELLO (secagg_client.py)
    progress: bool = True
    speed: float = 1.0  # slowdown factor: training takes this many times as long (local.straggle_seconds)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ClientConfig":
        """ValueError, one line, when the secret or the --tls-ca file cannot be loaded."""
        try:
            tls = client_tls_context(args.tls_ca) if args.tls_ca else None
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load --tls-ca {args.tls_ca}: {exc}") from None
        return cls(host=args.host, port=args.port, secret=resolve_secret(args.secret, args.secret_file), tls=tls,
                   connect_timeout=args.connect_timeout, quantization=args.quantization,
                   stochastic_rounding=args.stochastic_rounding,
                   seed=cls.seed if args.seed is None else args.seed, model=args.model, device=args.device,
                   progress=not (args.no_progress or args.quiet), speed=args.speed)


def pick_device(choice: str) -> torch.device:
    """The --device choice as a torch device; ValueError for cuda without one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)
