"""Federated-learning server: holds the global ImprovedCNN and runs federated rounds over TCP.

Each round the strategy's clients are sampled from those connected, sent the global model,
and their updates validated, screened and aggregated as they arrive (FedAvg weighted by
sample count by default; ``--strategy`` picks another). The new model goes out at once and
the finished round is evaluated on the MNIST test set in the background, checkpointed
atomically and logged as one JSON line.

    python server.py --rounds 5 --min-clients 3 [--strategy fedadam --fraction 0.5]

With ``--mode async`` no round waits for its slowest client: buffered asynchronous steps
(FedBuff), ``fl/server/asynchronous.py`` and docs/async.md.

This file is the command line; the server is ``fl/server/``: ``config.py`` (settings),
``app.py`` (start-up and the round loop), ``transport.py`` (sockets, TLS, handshakes),
``ingest.py`` (decoding updates), ``federation.py`` (round logic), ``evaluator.py``
(evaluation, checkpoints, metrics); the strategies are ``fl/strategies/``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from fl import privacy, strategies
from fl.common.cli import HelpFormatter
from fl.learning.config import DATASETS, OPTIMIZERS, SCHEMES, TrainingConfig
from fl.learning.data import DataError
from fl.learning.datasets import check_trainable
from fl.server import app, tensorboard
from fl.server import secagg as secagg_server
from fl.server.config import MIN_SHARDS, MODES, ServerConfig
from fl.strategies.base import StrategyError
from fl.strategies.staleness import STALENESS_RULES

TRAINING_FLAGS = {"epochs": "--local-epochs", "batch_size": "--batch-size", "lr": "--lr",
                  "momentum": "--client-momentum"}  # TrainingConfig's fields by their flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Federated-learning server: runs rounds over TCP clients, evaluated on the MNIST test set.",
        formatter_class=HelpFormatter)
    d = ServerConfig()
    add_network_arguments(p, d)
    add_federation_arguments(p, d)
    add_async_arguments(p, d)
    add_split_arguments(p, d)
    add_strategy_arguments(p)
    add_privacy_arguments(p)
    secagg_server.add_arguments(p)
    add_output_arguments(p, d)
    return p


def setting(group: argparse._ArgumentGroup, d: ServerConfig, name: str, help: str) -> None:
    """The flag of a ServerConfig field (``max_frame_mb`` -> ``--max-frame-mb``), with the
    field's default and type; a field that is False is a switch that turns it on."""
    value, flag = getattr(d, name), "--" + name.replace("_", "-")
    if value is False:
        group.add_argument(flag, action="store_true", help=help)
    else:
        group.add_argument(flag, type=type(value), default=value, help=help)


def add_network_arguments(p: argparse.ArgumentParser, d: ServerConfig) -> None:
    net = p.add_argument_group("network")
    setting(net, d, "host", "address to listen on (0.0.0.0 for all interfaces)")
    setting(net, d, "port", "TCP port (0 picks a free one)")
    net.add_argument("--secret-file", default=None, metavar="PATH",
                     help="file holding the shared secret clients must prove (or set $FL_SECRET); "
                          "without either, the server is open to anyone who can reach it")
    net.add_argument("--clients-file", default=None, metavar="PATH",
                     help="per-client secrets, one 'client_id secret' per line: a participant cannot "
                          "take over another's id (instead of a shared secret)")
    net.add_argument("--secret", default=None,
                     help="the shared secret itself: visible in the process list, so prefer --secret-file "
                          "or $FL_SECRET")
    net.add_argument("--tls-cert", default=None, help="PEM certificate: serve over TLS")
    net.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    setting(net, d, "max_connections", "authenticated clients at once")
    setting(net, d, "max_pending", "connections still in their handshake, all addresses together")
    setting(net, d, "max_pending_per_address", "connections still in their handshake from one address")
    setting(net, d, "max_frame_mb", "largest frame accepted, MiB (the float32 model is 1.7 MB)")
    setting(net, d, "handshake_timeout", "seconds a new connection has to authenticate")


def add_federation_arguments(p: argparse.ArgumentParser, d: ServerConfig) -> None:
    fl = p.add_argument_group("federation")
    setting(fl, d, "rounds", "federated rounds to run (with --mode async: server steps, each applying one buffer)")
    fl.add_argument("--target-accuracy", type=float, default=None, metavar="A",
                    help="stop once a round's test accuracy reaches A (0-1); evaluation runs beside the next "
                         "round, so that round still completes")
    setting(fl, d, "min_clients", "clients that must be connected before a round starts")
    setting(fl, d, "fraction",
            "fraction of the connected clients sampled each round: max(--min-fit, ceil(F x connected))")
    setting(fl, d, "min_fit", "fewest clients sampled, and updates a round needs to be aggregated (else retried)")
    setting(fl, d, "round_timeout", "seconds to wait for the updates of a round")
    setting(fl, d, "max_attempts", "attempts of one round (too few updates, a refused aggregate) before the run "
            "stops with exit status 1, the checkpoint at the last completed round")
    fl.add_argument("--quantize-broadcast", action="store_true",
                    help="send the global model as an 8-bit delta to clients that hold the previous one")
    fl.add_argument("--local-epochs", type=int, default=d.training.epochs,
                    help="local epochs per round (sent to clients)")
    fl.add_argument("--lr", type=float, default=d.training.lr, help="clients' learning rate in round 1")
    fl.add_argument("--client-optimizer", choices=OPTIMIZERS, default=d.training.optimizer,
                    help="clients' optimizer, fresh each round (sgd: the FedAvg paper's; try it on "
                         "label-skewed shards, with a larger --lr such as 0.05)")
    fl.add_argument("--client-momentum", type=float, default=d.training.momentum,
                    help="momentum of the clients' SGD (0: plain SGD, as in the FedAvg paper)")
    fl.add_argument("--freeze-bn-after", type=int, default=None, metavar="ROUND",
                    help="FixBN (Zhong et al., ICML 2024): after this round, clients' BatchNorm layers "
                         "normalise with the global model's running statistics, which then stay fixed "
                         "(for label-skewed shards, whose batches see only a few classes; 0: from the start)")
    fl.add_argument("--lr-schedule", choices=("cosine", "constant"), default=d.lr_schedule,
                    help="cosine decays the learning rate to 0.1x by the last round")
    fl.add_argument("--batch-size", type=int, default=d.training.batch_size, help="clients' batch size")
    fl.add_argument("--no-augment", action="store_true", help="tell clients to train without augmentation")
    fl.add_argument("--hflip", action="store_true", help="add random horizontal flips to augmentation (hurts digits)")
    setting(fl, d, "seed", "seed of the initial global model, the data split and client "
                           "sampling (under DP the sample is secret, not seeded)")


def add_async_arguments(p: argparse.ArgumentParser, d: ServerConfig) -> None:
    g = p.add_argument_group("asynchronous aggregation", (
        "FedBuff (Nguyen et al., AISTATS 2022): no round waits for its slowest client. Up to --concurrency "
        "clients train at once, each from the newest model; every --buffer-size accepted updates make one "
        "server step (the strategy's), a new model version, and one metrics line. See docs/async.md"))
    g.add_argument("--mode", choices=MODES, default=d.mode,
                   help="sync: rounds that wait for their sampled clients; async: buffered asynchronous steps")
    setting(g, d, "concurrency", "--mode async: clients training at once (a freed slot is refilled at once)")
    setting(g, d, "buffer_size", "--mode async: accepted updates per server step, at most one per client "
                                 "(needs --min-clients at least this)")
    g.add_argument("--staleness-weight", choices=STALENESS_RULES, default=None,
                   help="--mode async: an update's delta is scaled by s(staleness), staleness = versions "
                        "published since the one it trained from; polynomial: 1/sqrt(1 + staleness), constant: 1 "
                        "(default: polynomial; constant under DP)")
    g.add_argument("--max-staleness", type=int, default=None, metavar="S",
                   help="--mode async: refuse an update more than S versions old (default: no limit)")


def add_split_arguments(p: argparse.ArgumentParser, d: ServerConfig) -> None:
    g = p.add_argument_group("data split", "told to every client started without --num-clients, with the lowest "
                                           "free shard when it brings no --client-id; --seed seeds it")
    g.add_argument("--num-shards", type=int, default=None, metavar="N",
                   help=f"shards the training set is cut into, one per client (default: --min-clients, "
                        f"at least {MIN_SHARDS})")
    g.add_argument("--partition", choices=SCHEMES, default=d.partition,
                   help="how the shards are drawn: IID, label-skewed Dirichlet(alpha), or the FedAvg "
                        "paper's pathological split (sorted by label, two shards per client)")
    setting(g, d, "alpha", "Dirichlet concentration for --partition dirichlet (smaller = more label skew)")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset, metavar="NAME",
                   help="what the clients train on and the server tests on: " + ", ".join(DATASETS) +
                        " (folder: --data-dir holds one subfolder of images per class, or train/ and test/ "
                        "holding those; made 1-channel 28x28)")
    setting(g, d, "test_fraction", "--dataset folder without train/ and test/: the share held out for testing")


def add_output_arguments(p: argparse.ArgumentParser, d: ServerConfig) -> None:
    io = p.add_argument_group("data and output")
    io.add_argument("--data-dir", default=None, help="folder with the --dataset files (default: $MNIST_DATA_DIR or ./data)")
    io.add_argument("--no-download", action="store_true", help="never try to download the --dataset files")
    io.add_argument("--test-limit", type=int, default=None,
                    help="evaluate on the first N test images only (quick runs)")
    io.add_argument("--checkpoint", default=d.checkpoint, help="global model, round, metrics and strategy state, "
                                                              "written after every round (never any credential)")
    setting(io, d, "resume", "continue from --checkpoint after its last completed round (the metrics file "
                             "keeps the rounds up to it)")
    setting(io, d, "overwrite", "start afresh even where --checkpoint or --metrics already exist (without it "
                                "or --resume, the server refuses to replace them)")
    io.add_argument("--metrics", default=d.metrics, help="JSON Lines file, one object per round")
    setting(io, d, "tensorboard", "folder for TensorBoard event files of every round's scalars (default: none)")
    io.add_argument("--threads", type=int, default=None, help="torch threads for evaluation (default: torch's choice)")
    io.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    io.add_argument("-v", "--verbose", action="store_true", help="debug logging (every join, every update)")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_strategy_arguments(p: argparse.ArgumentParser) -> None:
    """--strategy, the options every strategy shares, and one flag per strategy parameter
    (each strategy's dataclass fields), so a new strategy file brings its own flags."""
    d = ServerConfig()
    known = strategies.available()
    holding = [n for n, cls in known.items() if cls.holds_updates]
    g = p.add_argument_group("aggregation", (
        f"{', '.join(holding)} hold the round's updates (memory grows with the sampled clients); the "
        "others fold each update as it arrives (memory: one model). Strategy parameters apply to the "
        "strategies named in their help."))
    g.add_argument("--strategy", default=d.strategy, choices=list(known), metavar="NAME",
                   help=f"aggregation strategy: {', '.join(known)}")
    g.add_argument("--weighting", choices=("samples", "uniform"), default=None,
                   help="weight of each update in the mean: its sample count (capped by --max-samples), or 1 "
                        "(default: samples; uniform under DP)")
    g.add_argument("--clip-norm", type=float, default=None,
                   help="scale each update's delta down to this L2 norm before it is aggregated (any strategy)")
    g.add_argument("--max-samples", type=int, default=d.max_samples,
                   help="largest sample count a client may claim (60,000: the MNIST training set)")
    g.add_argument("--norm-ratio", type=float, default=d.norm_ratio,
                   help="reject an update whose pull on the mean, weight x delta norm (the norm alone under "
                        "uniform weighting), exceeds this multiple of the median of the round's (0: off)")
    for name, f in strategies.cli_parameters().items():
        g.add_argument("--" + name.replace("_", "-"), dest=f"strategy_{name}", type=f.type, default=argparse.SUPPRESS,
                       metavar=name.upper(), help=f.metadata["help"])


def add_privacy_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("differential privacy", (
        "client-level DP-FedAvg (McMahan et al. 2018): each sampled client's delta clipped to --clip-norm, "
        "a uniform mean over the m sampled clients, Gaussian noise of std z x C / m; epsilon at --dp-delta "
        "from dp-accounting's RDP accountant, in every round's metrics"))
    g.add_argument("--dp-noise-multiplier", type=float, default=None, metavar="Z",
                   help="turn DP on with noise multiplier z (0: clipping only); needs --clip-norm")
    g.add_argument("--dp-clipping", choices=("server", "client"), default="server",
                   help="who clips: the server (clients trust it with raw deltas), or each client itself")
    g.add_argument("--dp-adaptive", action="store_true",
                   help="the clip norm follows a quantile of the update norms (Andrew et al. 2021), "
                        "starting at --clip-norm")
    g.add_argument("--dp-target-quantile", type=float, default=0.5, help="adaptive clipping's target quantile")
    g.add_argument("--dp-clip-lr", type=float, default=0.2, help="adaptive clipping's learning rate")
    g.add_argument("--dp-delta", type=float, default=None, help="delta of (epsilon, delta) (default: 1/N^1.1)")
    g.add_argument("--dp-population", type=int, default=None, metavar="N",
                   help="clients in the federation, for the planned rate m/N and delta's 1/N^1.1; "
                        "rounds are charged at the rate they realised (default: --min-clients)")
    g.add_argument("--target-epsilon", type=float, default=None,
                   help="stop before the round that would spend more than this epsilon")
    g.add_argument("--dp-seed", type=int, default=None,
                   help="seed the noise for a reproducible run (default: from the OS's CSPRNG; the log says which)")


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """The config, and the namespace for the credentials (which never enter the config).
    A bad value ends the program with argparse's one-line error (exit 2)."""
    p = build_parser()
    a = p.parse_args(argv)
    secagg = secagg_server.check_arguments(p, a)  # may set uniform weighting and --min-fit 2
    check_network(p, a)
    check_federation(p, a)
    check_split(p, a)
    params = check_aggregation(p, a)
    check_privacy(p, a)
    if a.tensorboard and (problem := tensorboard.problem(a.tensorboard)):
        p.error(problem)
    try:
        config = to_config(a, check_training(p, a), params, secagg)
    except ValueError as exc:  # ServerConfig's own checks (the asynchronous settings)
        p.error(str(exc))
    try:
        strategy = app.build_strategy(config)
        if config.asynchronous and hasattr(strategy, "begin_round"):  # DP: every step averages a buffer of K
            strategy.begin_round(config.buffer_size)
    except StrategyError as exc:
        p.error(str(exc))
    return config, a


def check_network(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if not 0 <= a.port <= 65535:
        p.error(f"--port {a.port} is not a TCP port")
    if a.max_samples < 1 or a.max_connections < 1 or a.max_pending < 1 or a.max_pending_per_address < 1:
        p.error("--max-samples, --max-connections, --max-pending and --max-pending-per-address must be at least 1")
    if a.max_frame_mb < 1:
        p.error("--max-frame-mb must be at least 1")


def check_federation(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.rounds < 1 or a.min_clients < 1 or a.min_fit < 1:
        p.error("--rounds, --min-clients and --min-fit must be at least 1")
    if a.min_fit > a.min_clients:
        p.error("--min-fit cannot exceed --min-clients")
    if not 0 < a.fraction <= 1:
        p.error(f"--fraction must be in (0, 1], got {a.fraction}")
    if a.freeze_bn_after is not None and a.freeze_bn_after < 0:
        p.error(f"--freeze-bn-after must be >= 0, got {a.freeze_bn_after}")
    if a.client_momentum and a.client_optimizer != "sgd":
        p.error("--client-momentum needs --client-optimizer sgd")
    if a.target_accuracy is not None and not 0 < a.target_accuracy <= 1:
        p.error(f"--target-accuracy must be in (0, 1], got {a.target_accuracy}")
    if a.max_attempts < 1:
        p.error(f"--max-attempts must be at least 1, got {a.max_attempts}")


def check_split(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Split holds the checks; fewer shards than --min-clients could never start a round."""
    try:
        split = ServerConfig(num_shards=a.num_shards, min_clients=a.min_clients, partition=a.partition,
                             alpha=a.alpha, seed=a.seed, dataset=a.dataset, test_fraction=a.test_fraction).split()
        check_trainable(split.dataset)
    except DataError as exc:
        p.error(str(exc))
    except ValueError as exc:  # "num_shards must be ..." -> "--num-shards must be ..."
        key, _, rest = str(exc).partition(" ")
        keys = ("num_shards", "alpha", "seed", "test_fraction")
        p.error(f"--{key.replace('_', '-')} {rest}" if key in keys else str(exc))
    if split.num_shards < a.min_clients:
        p.error(f"--num-shards {split.num_shards} is below --min-clients {a.min_clients}: clients given a "
                "shard could never start a round")


def check_aggregation(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict[str, object]:
    """The strategy's parameters given on the command line, checked by the strategy itself."""
    if a.clip_norm is not None and not a.clip_norm > 0:
        p.error(f"--clip-norm must be positive, got {a.clip_norm}")
    if a.norm_ratio is not None and a.norm_ratio != 0 and not a.norm_ratio > 1:
        p.error(f"--norm-ratio must be > 1 (or 0 to turn screening off), got {a.norm_ratio}")
    params = {k[len("strategy_"):]: v for k, v in vars(a).items() if k.startswith("strategy_") and v is not None}
    try:
        strategies.make(a.strategy, **params)
    except StrategyError as exc:
        p.error(str(exc))
    return params


def check_privacy(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.dp_noise_multiplier is not None:
        if a.weighting == "samples":
            p.error(privacy.WEIGHTING_MESSAGE)
        if a.clip_norm is None:
            p.error("--dp-noise-multiplier needs --clip-norm C: the clip norm is the sensitivity bound")
        if a.target_epsilon is not None and not a.target_epsilon > 0:
            p.error(f"--target-epsilon must be positive, got {a.target_epsilon}")
        if a.dp_population is not None and a.dp_population < a.min_clients:
            p.error("--dp-population cannot be smaller than --min-clients")
        if a.dp_delta is not None and not 0 < a.dp_delta < 1:
            p.error(f"--dp-delta must be in (0, 1), got {a.dp_delta}")
    elif a.target_epsilon is not None or a.dp_adaptive:
        p.error("--target-epsilon and --dp-adaptive need --dp-noise-multiplier")


def check_training(p: argparse.ArgumentParser, a: argparse.Namespace) -> TrainingConfig:
    """What clients are told to train with; TrainingConfig holds the checks."""
    try:
        return TrainingConfig(epochs=a.local_epochs, lr=a.lr, batch_size=a.batch_size, optimizer=a.client_optimizer,
                              momentum=a.client_momentum, augment=not a.no_augment, hflip=a.hflip)
    except ValueError as exc:  # "lr must be > 0, got 0" -> "--lr must be > 0, got 0"
        key, _, rest = str(exc).partition(" ")
        p.error(f"{TRAINING_FLAGS[key]} {rest}" if key in TRAINING_FLAGS else f"clients' training settings: {exc}")


def to_config(a: argparse.Namespace, training: TrainingConfig, params: dict[str, object],
              secagg: dict[str, object]) -> ServerConfig:
    """Every ServerConfig field that has a flag of its name takes the flag's value; the
    rest are derived here (credentials never enter the config)."""
    flags = {f.name: getattr(a, f.name) for f in fields(ServerConfig) if hasattr(a, f.name)}
    dp = a.dp_noise_multiplier is not None
    derived = dict(training=training, strategy_params=params, weighting=a.weighting or ("uniform" if dp else "samples"),
                   staleness_weight=a.staleness_weight or ("constant" if dp else "polynomial"),
                   norm_ratio=a.norm_ratio or None, download=not a.no_download,
                   progress=not (a.no_progress or a.quiet))
    return ServerConfig(**{**flags, **secagg, **derived})


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    return app.main(config, args)


if __name__ == "__main__":
    sys.exit(main())
