"""The server's run: build the federation from a ServerConfig, listen, run the rounds and
evaluate each finished one in the background. ``server.py`` is its command line."""
from __future__ import annotations

import argparse
import logging
import random
import signal
import ssl
import sys
import threading
import time
from typing import Any

import torch
from tqdm import tqdm

from fl import privacy, strategies
from fl.common.limits import limit_malloc_arenas, raise_open_files
from fl.common.logs import sanitize, setup_logging
from fl.learning.data import DataError, resolve_data_dir
from fl.learning.datasets import load_dataset
from fl.learning.model import ImprovedCNN
from fl.server import checkpoint as ckpt
from fl.server import secagg as secagg_server
from fl.server.asynchronous import AsyncFederation
from fl.server.config import ServerConfig
from fl.server.evaluator import Evaluator, Finished, summary
from fl.server.federation import Federation
from fl.server.outputs import OutputsError, check_outputs
from fl.server.sampling import SECRET_SAMPLING, sample_size
from fl.server.transport import FLServer
from fl.wire.credentials import CredentialError, build_keyring, resolve_secret
from fl.wire.tls import server_tls_context

log = logging.getLogger("server")


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
    """The accountant, or None without DP. It charges each round (or asynchronous step, m = the
    buffer's updates) at the m of n it realised; the declared N (--dp-population, else
    --min-clients) sets the default delta and the rate --target-epsilon plans with."""
    if not config.dp:
        return None
    population = config.dp_population or config.min_clients
    # An asynchronous step releases the noised mean of one buffer: K updates of the n connected.
    per_round = config.buffer_size if config.asynchronous else sample_size(population, config.fraction, config.min_fit)
    return privacy.PrivacyAccountant(strategy.accounting_noise_multiplier, population, per_round, config.dp_delta)


def _one_line(exc: BaseException) -> str:
    return sanitize(f"{type(exc).__name__}: {exc}")


def resume(fed: Federation, config: ServerConfig, accountant: Any = None) -> ckpt.History:
    """Load and check the checkpoint, restore model, strategy, accountant and RNG;
    ValueError/OSError if unusable."""
    saved = ckpt.load(config.checkpoint)
    ckpt.check(saved, fed.global_state, config.rounds)
    state = saved.get("strategy") or {}
    if state.get("strategy", fed.strategy.name) != fed.strategy.name or (not state and fed.strategy.state_dict()):
        log.warning("the checkpoint holds no %s state (written by %s): its server optimizer starts fresh",
                    fed.strategy.name, state.get("strategy", "a stateless strategy"))
    elif state:
        fed.strategy.load_state_dict(state, numel=fed.layout.float_numel)
    resume_accountant(accountant, saved.get("privacy"), saved["round"])
    fed.global_state = fed.layout.unflatten(*fed.layout.flatten(saved["model"]))
    fed.start_round = saved["round"]
    fed.restore_schedule(saved.get("schedule"))
    ckpt.restore_rng(saved)
    return ckpt.History(saved["metrics"])


def resume_accountant(accountant: Any, saved: dict[str, Any] | None, rounds: int) -> None:
    """Take over the rounds the checkpoint's accountant charged, each at its own noise
    multiplier; never re-account them with this run's flags. ValueError if they cannot be."""
    if accountant is None:
        if saved is not None:
            log.warning("the checkpoint's %d rounds ran under DP; this run adds no noise, so no privacy "
                        "guarantee covers what it releases", rounds)
        return
    if saved is None:
        if rounds:
            raise ValueError(f"its {rounds} rounds have no privacy accountant state (run without DP, or by an "
                             "older version): no epsilon covers them under DP; start a new run")
        return
    accountant.load_state_dict(saved)
    if accountant.rounds != rounds:
        raise ValueError(f"its privacy accountant charged {accountant.rounds} rounds, the checkpoint has {rounds}")


def passes_target(accountant: Any, config: ServerConfig, number: int, rnd: Any = None) -> bool:
    """--target-epsilon: checked before round ``number`` at the planned rate (m of the declared
    N), and again once it is sampled, at the rate ``rnd`` realised (m of the n connected),
    before its aggregate is released: fewer clients than planned spend more per round."""
    if accountant is None or config.target_epsilon is None:
        return False
    planned = rnd is None
    n, m = (accountant.num_clients, accountant.clients_per_round) if planned else (rnd.connected, len(rnd.participants))
    spent = accountant.epsilon_if(n, m)
    if spent <= config.target_epsilon:
        return False
    log.warning("stopping %s round %d: %d sampled of %d %s would spend epsilon %.3f > --target-epsilon %g (delta %.3g)",
                "before" if planned else "without releasing", number, m, n, "declared" if planned else "connected",
                spent, config.target_epsilon, accountant.delta)
    return True


class StartupError(Exception):
    """A setting the server cannot start with; its text is the one line the user sees."""


def main(config: ServerConfig, args: argparse.Namespace) -> int:
    """Run a server; ``args`` holds the credentials flags, which never enter the config."""
    setup_logging(config.quiet, config.verbose)
    limit_malloc_arenas()
    raise_open_files(config.max_connections + config.max_pending + 64)  # sockets, files, ingest
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        test_set = load_test_set(config)
        check_outputs(config.checkpoint, config.metrics, config.resume, config.overwrite)
        fed, history, accountant = build_federation(config)
        server = listen(config, fed, args)
    except (StartupError, OutputsError) as exc:
        log.error("%s", exc)
        return 2
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    stop_on_signals(fed)
    try:
        return run(fed, config, history, test_set, accountant)
    finally:
        server.refusals.flush()
        server.shutdown()
        server.server_close()


def load_test_set(config: ServerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        images, labels = load_dataset(config.dataset, resolve_data_dir(config.data_dir), train=False,
                                      download=config.download, test_fraction=config.test_fraction)
    except DataError as exc:
        raise StartupError(str(exc)) from None
    if config.test_limit:
        images, labels = images[:config.test_limit], labels[:config.test_limit]
    log.info("test set: %d images of %s", len(labels), config.dataset)
    return images, labels


def build_federation(config: ServerConfig) -> tuple[Federation, ckpt.History, Any]:
    """The seeded initial model (or the checkpoint's, with --resume), the strategy and the
    accountant; the metrics file is rewritten to the rounds the run starts after."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    strategy = build_strategy(config)
    accountant = build_accountant(config, strategy)
    fed_class = secagg_server.SecAggFederation if config.secure_aggregation else \
        AsyncFederation if config.asynchronous else Federation
    fed = fed_class(config, strategy, {k: v.detach().clone() for k, v in ImprovedCNN().state_dict().items()})
    fed.start_round = 0
    history = ckpt.History()
    if config.resume:
        try:
            history = resume(fed, config, accountant)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot resume from {config.checkpoint}: {_one_line(exc)}") from None
        log.info("resumed from %s after round %d", config.checkpoint, fed.start_round)
    if accountant is not None:
        log.info("%s; %s; noise %s", strategy.describe(), accountant.describe(),
                 "seeded by --dp-seed (reproducible)" if config.dp_seed is not None else "from the OS CSPRNG")
        log.info("%s", SECRET_SAMPLING)
        if accountant.rounds:
            log.info("privacy: the checkpoint's %d rounds spent epsilon %.3f at delta %.3g (accounted at z = %s)",
                     accountant.rounds, accountant.epsilon(), accountant.delta,
                     ", ".join(sorted({f"{z:g}" for z, _, _ in accountant.released})))
    ckpt.rewrite_metrics(config.metrics, history)
    return fed, history, accountant


def listen(config: ServerConfig, fed: Federation, args: argparse.Namespace) -> FLServer:
    """The listening server with its key ring and TLS context (not serving yet)."""
    try:
        keyring = build_keyring(resolve_secret(args.secret, args.secret_file), args.clients_file)
    except CredentialError as exc:
        raise StartupError(str(exc)) from None
    if args.secret:
        log.warning("--secret is visible to every user of this machine in the process list; "
                    "prefer --secret-file or $FL_SECRET")
    try:
        tls = server_tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load the TLS certificate/key: {_one_line(exc)}") from None
    try:
        server = (secagg_server.SecAggFLServer if config.secure_aggregation else FLServer)(config, fed, keyring, tls)
    except OSError as exc:
        raise StartupError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    schedule = (f"{config.rounds} asynchronous steps of {config.buffer_size} updates ({config.concurrency} clients "
                f"training at once, {config.staleness_weight} staleness weight)" if config.asynchronous
                else f"{config.rounds} rounds")
    log.info("listening on %s:%d%s; %s of %s, waiting for %d clients", config.host,
             server.server_address[1], " (TLS)" if tls else "", schedule, config.strategy, config.min_clients)
    if config.secure_aggregation:
        log.info("%s", secagg_server.describe(config))
    if not keyring.required:
        log.warning("no secret set: any client that can reach this port may join (--secret-file or FL_SECRET)")
    return server


def stop_on_signals(fed: Federation) -> None:
    """Ctrl-C or SIGTERM: finish the step under way, then stop (the checkpoint stays whole)."""
    def on_signal(signum: int, _frame: Any) -> None:
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        fed.stop.set()
        with fed.lock:
            fed.lock.notify_all()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def run(fed: Federation, config: ServerConfig, history: ckpt.History,
        test_set: tuple[torch.Tensor, torch.Tensor], accountant: Any = None) -> int:
    started = time.monotonic()
    bar = tqdm(total=config.rounds, initial=fed.start_round, desc="rounds", unit="round",
               disable=not config.progress, dynamic_ncols=True)
    evaluator = Evaluator(config, test_set, history, bar, on_failure=fed.stop.set)
    number, attempt = fed.start_round + 1, 0
    reason, status = "server stopping", 0
    while number <= config.rounds and not fed.stop.is_set():
        bar.set_description(f"round {number}")
        if evaluator.reached is not None:
            log.info("stopping before round %d: round %d reached %.2f%% >= --target-accuracy %g",
                     number, *evaluator.reached, config.target_accuracy)
            reason = "federation complete (target accuracy reached)"
            break
        if passes_target(accountant, config, number):
            reason = "federation complete (privacy budget spent)"
            break
        rnd = fed.run_round(number, attempt)
        if rnd is None or fed.stop.is_set():
            log.warning("round %d abandoned; the checkpoint keeps round %d", number, number - 1)
            break
        if passes_target(accountant, config, number, rnd):
            reason = "federation complete (privacy budget spent)"
            break
        state = fed.finish_round(rnd)
        if state is None:
            attempt += 1
            if attempt >= config.max_attempts:
                log.error("round %d failed %d attempts in a row (--max-attempts %d): stopping; the checkpoint "
                          "keeps round %d", number, attempt, config.max_attempts, number - 1)
                reason, status = f"server stopping (round {number} failed {attempt} attempts)", 1
                break
            continue
        strategy_state = {k: v.clone() if isinstance(v, torch.Tensor) else v
                          for k, v in fed.strategy.state_dict().items()}
        extra, privacy_state = {}, None
        if accountant is not None:
            accountant.step(rnd.connected, len(rnd.participants))  # the rate this round realised
            extra = {"epsilon": accountant.epsilon(), "delta": accountant.delta}
            privacy_state = accountant.state_dict()
        evaluator.submit(Finished(rnd, state, strategy_state, extra, privacy_state,  # overlaps the next round
                                  fed.schedule_state()))
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
    return status
