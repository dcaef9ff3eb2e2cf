"""Federated-learning server: holds the global ImprovedCNN and runs federated rounds over TCP.

Each round the strategy's clients are sampled from those connected, sent the global model,
and their updates validated, screened and aggregated as they arrive (FedAvg weighted by
sample count by default; ``--strategy`` picks another). The new model goes out at once and
the finished round is evaluated on the MNIST test set in the background, checkpointed
atomically and logged as one JSON line.

    python server.py --rounds 5 --min-clients 3 [--strategy fedadam --fraction 0.5]

The jobs live in their own files: ``config.py`` (settings), ``transport.py`` (sockets,
TLS, handshakes), ``ingest.py`` (decoding updates), ``federation.py`` (round logic),
``evaluator.py`` (evaluation, checkpoints, metrics) and ``strategies/``.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import random
import signal
import ssl
import sys
import threading
import time
from typing import Any

import torch
from tqdm import tqdm

import checkpoint as ckpt
import privacy
import secagg_server
import strategies
from config import ServerConfig
from data import DataError, load_mnist, resolve_data_dir
from evaluator import Evaluator, Finished, summary
from federation import Federation
from limits import raise_open_files
from logs import setup_logging
from model import ImprovedCNN
from credentials import CredentialError, build_keyring, resolve_secret
from logs import sanitize
from security import server_tls_context
from strategies.base import StrategyError
from training import OPTIMIZERS
from transport import FLServer

log = logging.getLogger("server")


# --- the command line ------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(
        description="Federated-learning server: runs rounds over TCP clients, evaluated on the MNIST test set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    net = p.add_argument_group("network")
    net.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0 for all interfaces)")
    net.add_argument("--port", type=int, default=d.port, help="TCP port (0 picks a free one)")
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
    net.add_argument("--max-connections", type=int, default=d.max_connections, help="authenticated clients at once")
    net.add_argument("--max-pending", type=int, default=d.max_pending,
                     help="connections still in their handshake, all addresses together")
    net.add_argument("--max-pending-per-address", type=int, default=d.max_pending_per_address,
                     help="connections still in their handshake from one address")
    net.add_argument("--max-frame-mb", type=int, default=d.max_frame_mb,
                     help="largest frame accepted, MiB (the float32 model is 1.7 MB)")
    net.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout,
                     help="seconds a new connection has to authenticate")
    fl = p.add_argument_group("federation")
    fl.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds to run")
    fl.add_argument("--target-accuracy", type=float, default=None, metavar="A",
                    help="stop once a round's test accuracy reaches A (0-1); evaluation runs beside the next "
                         "round, so that round still completes")
    fl.add_argument("--min-clients", type=int, default=d.min_clients,
                    help="clients that must be connected before a round starts")
    fl.add_argument("--fraction", type=float, default=d.fraction,
                    help="fraction of the connected clients sampled each round: max(--min-fit, ceil(F x connected))")
    fl.add_argument("--min-fit", type=int, default=d.min_fit,
                    help="fewest clients sampled, and updates a round needs to be aggregated (else retried)")
    fl.add_argument("--round-timeout", type=float, default=d.round_timeout, help="seconds to wait for the updates of a round")
    fl.add_argument("--quantize-broadcast", action="store_true",
                    help="send the global model as an 8-bit delta to clients that hold the previous one")
    fl.add_argument("--local-epochs", type=int, default=d.local_epochs, help="local epochs per round (sent to clients)")
    fl.add_argument("--lr", type=float, default=d.lr, help="clients' learning rate in round 1")
    fl.add_argument("--client-optimizer", choices=OPTIMIZERS, default=d.client_optimizer,
                    help="clients' optimizer, fresh each round (sgd: the FedAvg paper's; try it on "
                         "label-skewed shards, with a larger --lr such as 0.05)")
    fl.add_argument("--client-momentum", type=float, default=d.client_momentum,
                    help="momentum of the clients' SGD (0: plain SGD, as in the FedAvg paper)")
    fl.add_argument("--freeze-bn-after", type=int, default=None, metavar="ROUND",
                    help="FixBN (Zhong et al., ICML 2024): after this round, clients' BatchNorm layers "
                         "normalise with the global model's running statistics, which then stay fixed "
                         "(for label-skewed shards, whose batches see only a few classes; 0: from the start)")
    fl.add_argument("--lr-schedule", choices=("cosine", "constant"), default=d.lr_schedule,
                    help="cosine decays the learning rate to 0.1x by the last round")
    fl.add_argument("--batch-size", type=int, default=d.batch_size, help="clients' batch size")
    fl.add_argument("--no-augment", action="store_true", help="tell clients to train without augmentation")
    fl.add_argument("--hflip", action="store_true", help="add random horizontal flips to augmentation (hurts digits)")
    fl.add_argument("--seed", type=int, default=d.seed, help="seed of the initial global model and of client sampling")
    add_strategy_arguments(p)
    add_privacy_arguments(p)
    secagg_server.add_arguments(p)
    io = p.add_argument_group("data and output")
    io.add_argument("--data-dir", default=None, help="folder with the MNIST files (default: $MNIST_DATA_DIR or ./data)")
    io.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    io.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only (quick runs)")
    io.add_argument("--checkpoint", default=d.checkpoint, help="global model, round, metrics and strategy state, "
                                                              "written after every round (never any credential)")
    io.add_argument("--resume", action="store_true", help="continue from --checkpoint after the last completed round")
    io.add_argument("--metrics", default=d.metrics, help="JSON Lines file, one object per round")
    io.add_argument("--threads", type=int, default=None, help="torch threads for evaluation (default: all cores)")
    io.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    io.add_argument("-v", "--verbose", action="store_true", help="debug logging (every join, every update)")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


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
                   help="reject an update whose delta norm exceeds this multiple of the round's median (0: off)")
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
                   help="clients in the federation, for the accountant's sampling rate m/N (default: --min-clients)")
    g.add_argument("--target-epsilon", type=float, default=None,
                   help="stop before the round that would spend more than this epsilon")
    g.add_argument("--dp-seed", type=int, default=None,
                   help="seed the noise for a reproducible run (default: from the OS's CSPRNG; the log says which)")


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """The config, and the namespace for the credentials (which never enter the config)."""
    p = build_parser()
    a = p.parse_args(argv)
    secagg = secagg_server.check_arguments(p, a)  # may set uniform weighting and --min-fit 2
    if a.rounds < 1 or a.min_clients < 1 or a.min_fit < 1:
        p.error("--rounds, --min-clients and --min-fit must be at least 1")
    if a.min_fit > a.min_clients:
        p.error("--min-fit cannot exceed --min-clients")
    if not 0 < a.fraction <= 1:
        p.error(f"--fraction must be in (0, 1], got {a.fraction}")
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if not 0 <= a.port <= 65535:
        p.error(f"--port {a.port} is not a TCP port")
    if a.clip_norm is not None and not a.clip_norm > 0:
        p.error(f"--clip-norm must be positive, got {a.clip_norm}")
    if a.max_samples < 1 or a.max_connections < 1 or a.max_pending < 1 or a.max_pending_per_address < 1:
        p.error("--max-samples, --max-connections, --max-pending and --max-pending-per-address must be at least 1")
    if a.norm_ratio is not None and a.norm_ratio != 0 and not a.norm_ratio > 1:
        p.error(f"--norm-ratio must be > 1 (or 0 to turn screening off), got {a.norm_ratio}")
    if a.max_frame_mb < 1:
        p.error("--max-frame-mb must be at least 1")
    params = {k[len("strategy_"):]: v for k, v in vars(a).items() if k.startswith("strategy_") and v is not None}
    try:
        strategies.make(a.strategy, **params)
    except StrategyError as exc:
        p.error(str(exc))
    dp = a.dp_noise_multiplier is not None
    if dp:
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
    if not a.lr > 0:
        p.error(f"--lr must be positive, got {a.lr}")
    if a.freeze_bn_after is not None and a.freeze_bn_after < 0:
        p.error(f"--freeze-bn-after must be >= 0, got {a.freeze_bn_after}")
    if not 0 <= a.client_momentum < 1:
        p.error(f"--client-momentum must be in [0, 1), got {a.client_momentum}")
    if a.client_momentum and a.client_optimizer != "sgd":
        p.error("--client-momentum needs --client-optimizer sgd")
    if a.target_accuracy is not None and not 0 < a.target_accuracy <= 1:
        p.error(f"--target-accuracy must be in (0, 1], got {a.target_accuracy}")
    config = ServerConfig(
        host=a.host, port=a.port, tls_cert=a.tls_cert, tls_key=a.tls_key, max_connections=a.max_connections,
        max_pending=a.max_pending, max_pending_per_address=a.max_pending_per_address, max_frame_mb=a.max_frame_mb,
        handshake_timeout=a.handshake_timeout, rounds=a.rounds, target_accuracy=a.target_accuracy, min_clients=a.min_clients, min_fit=a.min_fit,
        fraction=a.fraction, round_timeout=a.round_timeout, quantize_broadcast=a.quantize_broadcast,
        local_epochs=a.local_epochs, lr=a.lr, client_optimizer=a.client_optimizer,
        client_momentum=a.client_momentum, freeze_bn_after=a.freeze_bn_after, lr_schedule=a.lr_schedule, batch_size=a.batch_size,
        augment=not a.no_augment, hflip=a.hflip, seed=a.seed, strategy=a.strategy, strategy_params=params,
        weighting=a.weighting or ("uniform" if dp else "samples"), clip_norm=a.clip_norm, max_samples=a.max_samples, norm_ratio=a.norm_ratio or None,
        data_dir=a.data_dir, download=not a.no_download, test_limit=a.test_limit, checkpoint=a.checkpoint,
        dp_noise_multiplier=a.dp_noise_multiplier, dp_clipping=a.dp_clipping, dp_adaptive=a.dp_adaptive,
        dp_target_quantile=a.dp_target_quantile, dp_clip_lr=a.dp_clip_lr, dp_delta=a.dp_delta,
        dp_population=a.dp_population, target_epsilon=a.target_epsilon, dp_seed=a.dp_seed, resume=a.resume, metrics=a.metrics, threads=a.threads, quiet=a.quiet, verbose=a.verbose,
        progress=not (a.no_progress or a.quiet), **secagg)
    try:
        build_strategy(config)
    except StrategyError as exc:
        p.error(str(exc))
    return config, a


def build_strategy(config: ServerConfig) -> strategies.Strategy:
    """The strategy, wrapped in DP-FedAvg when --dp-noise-multiplier is set."""
    strategy = strategies.make(config.strategy, **config.strategy_params)
    if not config.dp:
        return strategy
    generator, _ = privacy.make_generator(config.dp_seed)
    if config.dp_adaptive:
        return privacy.DPAdaptiveClipping(strategy, config.dp_noise_multiplier, config.clip_norm, generator,
                                          clipping=config.dp_clipping, target_quantile=config.dp_target_quantile,
                                          clip_lr=config.dp_clip_lr)
    return privacy.DPFixedClipping(strategy, config.dp_noise_multiplier, config.clip_norm, generator,
                                   clipping=config.dp_clipping)


def build_accountant(config: ServerConfig, strategy: Any) -> Any:
    """The accountant for m of N clients a round, or None without DP."""
    if not config.dp:
        return None
    from sampling import sample_size
    population = config.dp_population or config.min_clients
    per_round = sample_size(population, config.fraction, config.min_fit)
    return privacy.PrivacyAccountant(strategy.accounting_noise_multiplier, population, per_round, config.dp_delta)


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


def _one_line(exc: BaseException) -> str:
    return sanitize(f"{type(exc).__name__}: {exc}")


def resume(fed: Federation, config: ServerConfig) -> ckpt.History:
    """Load and check the checkpoint, restore model, strategy and RNG; ValueError/OSError if unusable."""
    saved = ckpt.load(config.checkpoint)
    ckpt.check(saved, fed.global_state, config.rounds)
    state = saved.get("strategy") or {}
    if state.get("strategy", fed.strategy.name) != fed.strategy.name or (not state and fed.strategy.state_dict()):
        log.warning("the checkpoint holds no %s state (written by %s): its server optimizer starts fresh",
                    fed.strategy.name, state.get("strategy", "a stateless strategy"))
    elif state:
        fed.strategy.load_state_dict(state)
    fed.global_state = fed.layout.unflatten(*fed.layout.flatten(saved["model"]))
    fed.start_round = saved["round"]
    ckpt.restore_rng(saved)
    return ckpt.History(saved["metrics"])


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    setup_logging(config.quiet, config.verbose)
    _limit_malloc_arenas()
    raise_open_files(config.max_connections + config.max_pending + 64)  # sockets, files, ingest
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        test_images, test_labels = load_mnist(resolve_data_dir(config.data_dir), train=False,
                                              download=config.download)
    except DataError as exc:
        log.error("%s", exc)
        return 2
    if config.test_limit:
        test_images, test_labels = test_images[:config.test_limit], test_labels[:config.test_limit]
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    strategy = build_strategy(config)
    accountant = build_accountant(config, strategy)
    fed_class = secagg_server.SecAggFederation if config.secure_aggregation else Federation
    fed = fed_class(config, strategy, {k: v.detach().clone() for k, v in ImprovedCNN().state_dict().items()})
    fed.start_round = 0
    history = ckpt.History()
    if config.resume:
        try:
            history = resume(fed, config)
        except (OSError, ValueError) as exc:
            log.error("cannot resume from %s: %s", config.checkpoint, _one_line(exc))
            return 2
        log.info("resumed from %s after round %d", config.checkpoint, fed.start_round)
    if accountant is not None:
        accountant.step(fed.start_round)  # every completed round released one noised aggregate
        log.info("%s; %s; noise %s", strategy.describe(), accountant.describe(),
                 "seeded by --dp-seed (reproducible)" if config.dp_seed is not None else "from the OS CSPRNG")
    ckpt.rewrite_metrics(config.metrics, history)
    try:
        keyring = build_keyring(resolve_secret(args.secret, args.secret_file), args.clients_file)
    except CredentialError as exc:
        log.error("%s", exc)
        return 2
    if args.secret:
        log.warning("--secret is visible to every user of this machine in the process list; "
                    "prefer --secret-file or $FL_SECRET")
    try:
        tls = server_tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot load the TLS certificate/key: %s", _one_line(exc))
        return 2
    try:
        server = (secagg_server.SecAggFLServer if config.secure_aggregation else FLServer)(config, fed, keyring, tls)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        return 2
    port = server.server_address[1]
    log.info("listening on %s:%d%s; %d rounds of %s, waiting for %d clients", config.host, port,
             " (TLS)" if tls else "", config.rounds, config.strategy, config.min_clients)
    if config.secure_aggregation:
        log.info("%s", secagg_server.describe(config))
    if not keyring.required:
        log.warning("no secret set: any client that can reach this port may join (--secret-file or FL_SECRET)")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    def on_signal(signum: int, _frame: Any) -> None:
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        fed.stop.set()
        with fed.lock:
            fed.lock.notify_all()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        return run(fed, config, history, (test_images, test_labels), accountant)
    finally:
        server.refusals.flush()
        server.shutdown()
        server.server_close()


def run(fed: Federation, config: ServerConfig, history: ckpt.History,
        test_set: tuple[torch.Tensor, torch.Tensor], accountant: Any = None) -> int:
    started = time.monotonic()
    bar = tqdm(total=config.rounds, initial=fed.start_round, desc="rounds", unit="round",
               disable=not config.progress, dynamic_ncols=True)
    evaluator = Evaluator(config, test_set, history, bar, on_failure=fed.stop.set)
    number, attempt = fed.start_round + 1, 0
    reason = "server stopping"
    while number <= config.rounds and not fed.stop.is_set():
        bar.set_description(f"round {number}")
        if evaluator.reached is not None:
            log.info("stopping before round %d: round %d reached %.2f%% >= --target-accuracy %g",
                     number, *evaluator.reached, config.target_accuracy)
            reason = "federation complete (target accuracy reached)"
            break
        if accountant is not None and config.target_epsilon is not None and \
                accountant.epsilon_after(accountant.rounds + 1) > config.target_epsilon:
            log.warning("stopping before round %d: it would spend epsilon %.3f > --target-epsilon %g (delta %.3g)",
                        number, accountant.epsilon_after(accountant.rounds + 1), config.target_epsilon,
                        accountant.delta)
            reason = "federation complete (privacy budget spent)"
            break
        rnd = fed.run_round(number, attempt)
        if rnd is None or fed.stop.is_set():
            log.warning("round %d abandoned; the checkpoint keeps round %d", number, number - 1)
            break
        state = fed.finish_round(rnd)
        if state is None:
            attempt += 1
            continue
        strategy_state = {k: v.clone() if isinstance(v, torch.Tensor) else v
                          for k, v in fed.strategy.state_dict().items()}
        extra = {}
        if accountant is not None:
            accountant.step()
            extra = {"epsilon": accountant.epsilon(), "delta": accountant.delta}
        evaluator.submit(Finished(rnd, state, strategy_state, extra))  # overlaps with the next round's training
        number, attempt = number + 1, 0
    evaluator.close()
    bar.close()
    fed.stop_all("federation complete" if number > config.rounds else reason)
    grace = min(config.round_timeout, 30.0)
    if fed.drain(grace):  # else clients mid-round would see a dead server and keep retrying
        log.warning("%d client(s) still busy after %.0f s; closing their connections", len(fed.sessions), grace)
    time.sleep(0.2)  # let the handlers close their sockets after the last DONE
    if not config.quiet:
        print("\nsummary\n" + summary(history, time.monotonic() - started, config), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
