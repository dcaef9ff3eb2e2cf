"""The server's side of secure aggregation (``--secure-aggregation``): the server learns
only the sum of the sampled clients' updates, and a round survives clients that drop out.

Three pieces plug into the ordinary server, which is otherwise unchanged:

- :class:`SecAggFederation` (a ``Federation``): every round's MODEL carries the round's
  ``secagg`` settings (``fl.secagg.wire.Settings``) and its task a :class:`fl.secagg.coordinator.SecAggRound`
  coordinator; the main thread drives that coordinator's stages (``collect``), then folds
  the decoded sum into the strategy's aggregator like any aggregate. A round whose
  coordinator aborts (fewer than the threshold of clients left) has no updates, so
  ``finish_round`` keeps the model and the round is retried, as under ``--min-fit``.
  A retry keeps the round's sample (less the clients gone or excluded) and tells the
  clients its attempt number, which enters their training seed: the server never gets
  two sums of the same inputs over different sets of clients.
- **What a participant can do, bounded**: a client whose own messages prove it cheated (a
  small-order key, an unmasking share that is not the one dealt to it, shares that do not
  rebuild its committed secret) is named in one line and excluded for the rest of the run;
  one whose secrets could not be rebuilt because its holders could not open the shares it
  dealt (their word, not proof) is left out of that round's next attempts.
  The decoded sum must be one that |survivors| clipped inputs can make: every coordinate
  within |survivors| x ``--secagg-clip`` (the encoding keeps headroom bits, so a wrapped or
  unclipped sum shows), and, with ``--clip-norm`` C, an L2 norm within |survivors| x C.
  Otherwise the attempt is refused (one line) and retried, never committed. Without
  ``--clip-norm`` only the coordinate bound holds (the start-up line says so).
- :class:`SecAggHandler` (a ``ClientHandler``): refuses clients that did not announce
  ``"secagg": true`` in HELLO, and serves each round as MODEL, then the four stages
  (receive, hand to the coordinator, wait for the stage to close, send the answer).
- :func:`add_arguments` / :func:`check_arguments`: the flags, and the combinations that
  cannot work without seeing individual updates (median, trimmed mean, server-side DP
  clipping, sample-count weighting), refused in one line with exit 2.

What the server gives up: it never holds one client's update, so it cannot screen update
norms (``--norm-ratio``), clip updates (``--clip-norm`` is applied by the clients), weight
by sample count (the mean is uniform over the survivors), or check a client's BatchNorm
variances. Clients clip their delta to ``--clip-norm`` (when given; and to the DP clip norm
under ``--dp-clipping client``) and each coordinate to ``[-clip, clip]`` before encoding.
"""
from __future__ import annotations

import argparse
import logging
import math
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fl import strategies
from fl.common.logs import sanitize, short_ids
from fl.common.vectors import InvalidUpdate
from fl.secagg import FixedPoint, SecAggCheat, SecAggError
from fl.secagg.coordinator import Left, RoundClosed, SecAggRound
from fl.secagg.wire import (
    MASKED_INPUT,
    STAGE_NAMES,
    UNMASKING,
    Settings,
    abort,
    decode_client,
    default_threshold,
    encode,
    group_size,
)
from fl.server.config import ServerConfig
from fl.server.contribution import Metadata, client_record, parse_metadata
from fl.server.federation import Federation, RoundState, RoundTask, Session
from fl.server.sampling import sample_size
from fl.server.transport import INGEST_WAIT_S, ClientHandler, FLServer, send_model
from fl.wire.errors import ProtocolError
from fl.wire.frames import Connection, MsgType, decode_payload, wait_readable

log = logging.getLogger("server")

REFUSAL = ("this server requires secure aggregation (--secure-aggregation) and this client did not "
           "announce support for it (HELLO option 'secagg'); update the client")


# --- the command line ---------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    g = p.add_argument_group("secure aggregation", (
        "the server learns only the sum of the updates (Bonawitz et al. 2017; SecAgg+ groups with "
        "--secagg-neighbours): clients mask their fixed-point deltas so that the masks cancel in the sum, "
        "and a round survives dropouts down to the threshold. The server cannot then screen, clip or "
        "sample-weight single updates: clients clip, the mean is uniform."))
    g.add_argument("--secure-aggregation", action="store_true",
                   help="require secure aggregation of every client (clients that cannot are refused)")
    g.add_argument("--secagg-threshold", type=int, default=None, metavar="T",
                   help="shares needed to rebuild a client's secrets: at least T clients of each group must "
                        "stay to the end (default: max(2, ceil(2g/3)) for groups of g, i.e. all sampled "
                        "clients or --secagg-neighbours)")
    g.add_argument("--secagg-neighbours", type=int, default=None, metavar="K",
                   help="SecAgg+: each client masks with and shares its secrets among a group of K (odd) "
                        "on a random graph, instead of all sampled clients (costs grow with K, not m)")
    g.add_argument("--secagg-clip", type=float, default=d.secagg_clip, metavar="C",
                   help="fixed-point range: each coordinate of a client's delta is clipped to [-C, C]")
    g.add_argument("--secagg-bits", type=int, default=d.secagg_bits, metavar="B",
                   help="the ring Z_2^B the masked sums live in (32: a masked update is as large as a float32 one)")
    g.add_argument("--secagg-stage-timeout", type=float, default=d.secagg_stage_timeout, metavar="S",
                   help="seconds for each key, share and unmasking stage (the masked input, for which clients "
                        "train, has the rest of --round-timeout)")


def check_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict[str, Any]:
    """Refuse what cannot work under secure aggregation (``p.error``: one line, exit 2);
    set uniform weighting and ``--min-fit`` >= 2 in ``a``; the ServerConfig fields."""
    flags = {"secagg_threshold": "--secagg-threshold", "secagg_neighbours": "--secagg-neighbours"}
    if not a.secure_aggregation:
        given = [flag for name, flag in flags.items() if getattr(a, name) is not None]
        if given:
            p.error(f"{given[0]} needs --secure-aggregation")
        return {}
    prefix = "--secure-aggregation: "
    cls = strategies.available().get(a.strategy)
    if cls is not None and cls.holds_updates:
        p.error(f"{prefix}--strategy {a.strategy} needs every client's update, which the server never sees; "
                "use an averaging strategy (fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad)")
    if a.dp_noise_multiplier is not None and (a.dp_clipping == "server" or a.dp_adaptive):
        p.error(f"{prefix}server-side DP clipping needs every client's update; use --dp-clipping client "
                "(clients clip, the server adds the noise to the sum)")
    if a.weighting == "samples":
        p.error(f"{prefix}the mean is uniform over the clients (a sample-count weight would need each update); "
                "drop --weighting samples")
    if a.min_clients < 2:
        p.error(f"{prefix}needs --min-clients >= 2 (the sum of one update is that update)")
    a.weighting = "uniform"
    a.min_fit = max(2, a.min_fit)
    t, k = a.secagg_threshold, a.secagg_neighbours
    if t is not None and t < 2:
        p.error(f"--secagg-threshold must be at least 2 (one share would reveal a secret), got {t}")
    if k is not None and (k < 3 or k % 2 == 0):
        p.error(f"--secagg-neighbours must be an odd group size >= 3, got {k}")
    if t is not None and k is not None and t > k:
        p.error(f"--secagg-threshold {t} exceeds the group size --secagg-neighbours {k}")
    smallest = sample_size(a.min_clients, a.fraction, min(a.min_fit, a.min_clients))
    if t is not None and t > smallest:
        p.error(f"--secagg-threshold {t} exceeds the {smallest} clients a round samples from --min-clients "
                f"{a.min_clients}")
    if not (math.isfinite(a.secagg_clip) and a.secagg_clip > 0):
        p.error(f"--secagg-clip must be positive, got {a.secagg_clip}")
    if not 8 <= a.secagg_bits <= 62:
        p.error(f"--secagg-bits must be in 8..62, got {a.secagg_bits}")
    if not a.secagg_stage_timeout > 0:
        p.error(f"--secagg-stage-timeout must be positive, got {a.secagg_stage_timeout}")
    try:
        FixedPoint(a.secagg_bits, a.secagg_clip, a.min_clients)
    except ValueError as exc:
        p.error(f"--secagg-bits/--secagg-clip: {exc}")
    return {"secure_aggregation": True, "secagg_threshold": t, "secagg_neighbours": k, "secagg_clip": a.secagg_clip,
            "secagg_bits": a.secagg_bits, "secagg_stage_timeout": a.secagg_stage_timeout}


def describe(config: ServerConfig) -> str:
    """One line for the server's log."""
    fp = FixedPoint(config.secagg_bits, config.secagg_clip, max(2, config.min_clients))
    t = config.secagg_threshold
    threshold = f"threshold {t}" if t else "threshold max(2, ceil(2g/3))"
    groups = f"SecAgg+ groups of {config.secagg_neighbours}" if config.secagg_neighbours else "groups: all sampled"
    clip = (f"; clients clip deltas to L2 {config.clip_norm:g} and a sum above |survivors| x {config.clip_norm:g} "
            "is refused" if config.clip_norm else
            "; no --clip-norm: the server bounds only each coordinate of the sum, so one client may move every "
            f"coordinate of the mean by up to {2 * config.secagg_clip:g}")
    return (f"secure aggregation: {threshold}, {groups}, ring 2^{config.secagg_bits}, coordinates clipped to "
            f"+-{config.secagg_clip:g} (step 2^-{fp.frac_bits} at {max(2, config.min_clients)} clients){clip}; "
            "the server sees only the sum: norm screening and server-side clipping are off, the mean is uniform")


# --- the round's settings ------------------------------------------------------------------

def round_settings(config: ServerConfig, sampled: int, length: int, number: int,
                   attempt: int = 0) -> tuple[Settings | None, str]:
    """The settings of a round of ``sampled`` clients, or (None, why it cannot run)."""
    if sampled < 2:
        return None, f"{sampled} client(s) sampled: secure aggregation needs at least 2"
    g = group_size(sampled, config.secagg_neighbours)
    t = config.secagg_threshold or default_threshold(g)
    if t > g:
        return None, f"threshold {t} exceeds the groups of {g} clients ({sampled} sampled)"
    settings = Settings(round=number, threshold=t, min_clients=max(t, min(config.min_fit, sampled)),
                        bits=config.secagg_bits, clip=config.secagg_clip, max_clients=sampled,
                        num_shares=None if g == sampled else g, length=length, l2_clip=config.clip_norm,
                        attempt=attempt)
    try:
        settings.config()
        settings.fixed_point()
    except ValueError as exc:
        return None, str(exc)
    return settings, ""


@dataclass
class Unrunnable:
    """A round that cannot run (too few clients for the threshold): the handlers send
    nothing, and the round is retried after a pause."""

    failure: str
    dropped: dict[int, str] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)

    def run(self, stop: Any = None) -> None:
        return None


# --- the round logic -------------------------------------------------------------------------

class SecAggFederation(Federation):
    """A ``Federation`` whose rounds run secure aggregation (see the module docstring)."""

    def __init__(self, config: ServerConfig, strategy: Any, initial_state: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(config, strategy, initial_state)
        self.clip_norm = None  # never one update to clip or screen: clients clip (Settings.l2_clip)
        self.norm_ratio = None
        self.settings: Settings | None = None
        self.problem = ""
        self.coordinator: SecAggRound | Unrunnable | None = None
        self.attempt = 0
        self.excluded: dict[int, str] = {}  # client -> the cheat it was caught at; never sampled again
        self.kept: tuple[int, list[int]] = (0, [])  # (round, sample) of the last attempt
        self.left_out: tuple[int, set[int]] = (0, set())  # (round, suspects left out of its next attempts)

    def round_extras(self, number: int, participants: dict[int, Session]) -> dict[str, Any]:
        self.settings, self.problem = round_settings(self.config, len(participants), self.layout.float_numel, number,
                                                     self.attempt)
        return {"secagg": self.settings.to_dict() if self.settings else None}

    def sample(self, number: int, attempt: int, connected: dict[int, Session]) -> list[int]:
        """A retry's sample is the last attempt's, less the clients gone or excluded, while
        at least --min-fit of them are connected; else (and for a round's first attempt) a
        draw among the clients not excluded."""
        suspects = self.left_out[1] if self.left_out[0] == number else set()
        with self.lock:
            eligible = {cid: s for cid, s in connected.items() if cid not in self.excluded and cid not in suspects}
        last_round, last = self.kept
        kept = [cid for cid in last if cid in eligible]
        if attempt > 0 and last_round == number and len(kept) >= max(2, self.config.min_fit):
            log.info("round %d, attempt %d: the same sample as the last attempt, %d of its %d clients (%d gone, "
                     "excluded or left out)", number, attempt + 1, len(kept), len(last), len(last) - len(kept))
            sampled = kept
        else:
            sampled = super().sample(number, attempt, eligible)
            if attempt > 0:
                log.info("round %d, attempt %d: too few of the last attempt's sample left; a new sample of %d",
                         number, attempt + 1, len(sampled))
        self.kept = (number, sampled)
        return sampled

    def open_round(self, number: int, attempt: int, connected: dict[int, Session]) -> tuple[RoundState, RoundTask]:
        self.attempt = attempt
        rnd, task = super().open_round(number, attempt, connected)
        cfg = self.config
        if self.settings is None:
            coordinator: SecAggRound | Unrunnable = Unrunnable(self.problem)
        else:
            coordinator = SecAggRound(self.settings.config(), self.settings.round, rnd.participants,
                                      start=rnd.started, round_deadline=task.deadline,
                                      stage_timeout=cfg.secagg_stage_timeout)
            for cid in rnd.reported:  # vanished between the snapshot and now
                coordinator.drop(cid, "disconnected")
        self.coordinator = task.secagg = coordinator
        return rnd, task

    def collect(self, rnd: RoundState, deadline: float) -> None:
        """Drive the coordinator's stages, then fold the decoded sum; no sum, no update."""
        coordinator = self.coordinator
        assert coordinator is not None
        total = coordinator.run(self.stop)
        for cid, reason in getattr(coordinator, "cheaters", {}).items():
            self.exclude(rnd.number, cid, reason)
        suspects = getattr(coordinator, "suspects", set())
        if suspects:
            left = self.left_out[1] if self.left_out[0] == rnd.number else set()
            self.left_out = (rnd.number, left | suspects)
            log.warning("round %d: client(s) %s left out of this round's next attempts: their holders could not open "
                        "the shares they dealt", rnd.number, short_ids(sorted(suspects)))
        with self.lock:
            self.forget(rnd, coordinator.dropped)  # timed out, hung up or refused
            rnd.bytes_up += sum(coordinator.bytes_up.values())
            rnd.bytes_down += sum(coordinator.bytes_down.values())
        if total is None:
            if not self.stop.is_set():
                log.warning("round %d: secure aggregation failed (%s); nothing of this attempt is used",
                            rnd.number, sanitize(coordinator.failure or "no result"))
            if isinstance(coordinator, Unrunnable):
                self.stop.wait(min(5.0, self.config.round_timeout))  # not a tight loop of retries
        else:
            assert isinstance(coordinator, SecAggRound)
            self.fold_secure(rnd, coordinator, total)
        self.close_round(rnd)

    def exclude(self, number: int, cid: int, reason: str) -> None:
        """Never sample ``cid`` again in this run: its own messages proved it cheated (one line)."""
        with self.lock:
            if cid in self.excluded:
                return
            self.excluded[cid] = reason
            if self.round is not None and self.round.number == number:
                self.round.rejected.append({"client_id": cid, "reason": sanitize(reason)})
        log.warning("round %d: client %d is excluded for the rest of the run (caught cheating at secure "
                    "aggregation): %s", number, cid, sanitize(reason))

    def bounded_sum(self, total: torch.Tensor, count: int) -> tuple[torch.Tensor | None, str]:
        """The decoded sum of ``count`` inputs, or (None, why no ``count`` clipped inputs can
        have made it): a coordinate beyond count x --secagg-clip, or an L2 norm beyond count x
        --clip-norm."""
        assert self.settings is not None
        fp = self.settings.fixed_point()
        beyond = fp.excess(total, count)
        if beyond:
            return None, (f"{beyond} coordinate(s) beyond {count} x {fp.clip:g}, the most {count} clipped "
                          "updates can reach")
        decoded = fp.decode(total, count)  # float64, exact
        limit = self.settings.l2_limit()
        if limit is not None:
            norm = float(decoded.norm())
            if norm > count * limit * (1 + 1e-9):  # the float64 norm's own rounding, no more
                return None, f"L2 norm {norm:.4g} beyond {count} x {limit:.4g} (--clip-norm)"
        return decoded, ""

    def fold_secure(self, rnd: RoundState, coordinator: SecAggRound, total: torch.Tensor) -> None:
        """The survivors' ring sum, decoded, bounded and folded; their clear metadata, uniformly."""
        assert self.settings is not None
        server = coordinator.server
        survivors = server.survivors
        decoded, why = self.bounded_sum(total, len(survivors))
        if decoded is None:
            log.error("round %d: refused the secure sum of %d updates: %s; a participant sent an unclipped or "
                      "malformed input; nothing of this attempt is used", rnd.number, len(survivors), why)
            return
        with self.lock:
            try:
                rnd.aggregator.add_sum(decoded, len(survivors))
            except (ValueError, TypeError) as exc:
                log.error("round %d: cannot fold the secure sum (%s)", rnd.number, exc)
                return
            for cid in survivors:
                meta: Metadata = coordinator.metadata[cid]
                rnd.int_sum.add_(meta.ints.to(torch.float64))
                rnd.int_weight += 1.0
                rnd.clients.append(client_record(cid, meta.num_samples, False, coordinator.bytes_up.get(cid, 0),
                                                 None, meta.metrics))
        dropped = [u for u in server.sharing if u not in survivors]
        silent = [u for u in survivors if u not in server.responders]
        log.info("round %d: secure sum of %d masked updates (threshold %d)%s%s", rnd.number, len(survivors),
                 self.settings.threshold,
                 f"; {len(dropped)} dropped before their masked input, their masks removed" if dropped else "",
                 f"; {len(silent)} dropped after it, still counted" if silent else "")

    def check_metadata(self, session: Session, meta: dict[str, Any]) -> Metadata:
        """The clear part of a masked-input message; SecAggError if it is wrong."""
        try:
            return parse_metadata(meta, self.layout.int_numel, self.sample_limit(session))
        except InvalidUpdate as exc:
            raise SecAggError(str(exc)) from None

    def reject(self, session: Session, round_num: int, reason: str) -> None:
        log.warning("round %d: refused secure-aggregation message from client %d: %s", round_num,
                    session.client_id, sanitize(reason))
        with self.lock:
            if self.round is not None and self.round.number == round_num:
                self.round.rejected.append({"client_id": session.client_id, "reason": sanitize(reason)})


# --- the transport ---------------------------------------------------------------------------

class SecAggHandler(ClientHandler):
    """A client connection of a secure-aggregation server."""

    def authenticate(self) -> tuple[Connection, Session]:
        conn, session = super().authenticate()
        if session.peer.options.get("secagg") is not True:
            log.warning("refused client %d from %s: it does not support secure aggregation",
                        session.client_id, self.address)
            conn.send_error(REFUSAL)
            conn.close()
            raise ProtocolError(f"client {session.client_id} does not support secure aggregation")
        return conn, session

    def serve_round(self, session: Session, conn: Connection, task: RoundTask) -> bool:
        coordinator = task.secagg
        if coordinator is None:  # never the plain path: the server must not see an update
            log.error("round %d: no secure-aggregation coordinator; dropping client %d", task.round,
                      session.client_id)
            return False
        if coordinator.failure is not None:
            return True  # the round cannot run: nothing is sent
        return _Service(self.server, session, conn, task, coordinator).run()


class _Service:
    """One client's part in one round, on its handler thread."""

    def __init__(self, server: FLServer, session: Session, conn: Connection, task: RoundTask,
                 coordinator: SecAggRound) -> None:
        self.fed: SecAggFederation = server.federation  # type: ignore[assignment]
        self.ingest = server.ingest
        self.session, self.conn, self.task, self.coord = session, conn, task, coordinator
        self.cid = session.client_id
        self.sent, self.received = conn.bytes_sent, conn.bytes_received

    def account(self) -> None:
        c = self.conn
        self.coord.count_bytes(self.cid, c.bytes_received - self.received, c.bytes_sent - self.sent)
        self.sent, self.received = c.bytes_sent, c.bytes_received

    def run(self) -> bool:
        conn, task, coord, cid = self.conn, self.task, self.coord, self.cid
        stage = 0
        try:
            send_model(conn, self.session, task, coord.deadline(0))
            for stage in range(UNMASKING + 1):
                msg, meta = decode_client(self.receive(stage, coord.deadline(stage)), stage)
                if stage == MASKED_INPUT:
                    meta = self.fed.check_metadata(self.session, meta)
                self.account()
                coord.submit(cid, stage, msg, meta or None)
                if stage == UNMASKING:
                    return True  # no answer: the client is done with this round
                reply = coord.wait(cid, stage)
                if isinstance(reply, Left):
                    conn.send(MsgType.SECAGG, abort(task.round, reply.reason), timeout=5.0)
                    self.account()
                    log.debug("round %d: client %d is out of the round: %s", task.round, cid, reply.reason)
                    return True
                conn.send(MsgType.SECAGG, encode(stage, reply),
                          timeout=max(1.0, coord.deadline(stage + 1) - time.monotonic()))
            return True
        except RoundClosed as exc:  # too late for its stage: the client hears the round is over for it
            if stage < UNMASKING:
                try:
                    conn.send(MsgType.SECAGG, abort(task.round, str(exc)), timeout=5.0)
                except (OSError, ProtocolError, ssl.SSLError):
                    coord.drop(cid, "connection lost")
                    return False
            return True
        except SecAggError as exc:  # a malformed or inconsistent message: refuse it and the client
            reason = f"secure aggregation, stage {STAGE_NAMES[stage]}: {exc}"
            if isinstance(exc, SecAggCheat):
                coord.drop(cid, "caught cheating")
                self.fed.exclude(task.round, cid, reason)
            else:
                coord.drop(cid, "refused message")
                self.fed.reject(self.session, task.round, reason)
            conn.send_error(reason)
            return False
        except (ProtocolError, OSError, ssl.SSLError) as exc:
            coord.drop(cid, f"{type(exc).__name__}")
            self.fed.fail(self.session, task.round, 0, f"{type(exc).__name__} at stage {STAGE_NAMES[stage]}: {exc}")
            return False
        finally:
            self.account()

    def receive(self, stage: int, deadline: float) -> dict[str, Any]:
        """One SECAGG body; the masked input (model-sized) into one of the ingest buffers."""
        conn = self.conn
        wait_readable(conn.sock, deadline)  # the client trains before its masked input: no slot held
        timeout = max(0.1, deadline - time.monotonic())
        if stage != MASKED_INPUT:
            return conn.recv(MsgType.SECAGG, timeout=timeout).body
        buffer = self.ingest.buffer(timeout=INGEST_WAIT_S)
        try:
            frame = conn.recv_frame(MsgType.SECAGG, timeout=timeout, buffer=buffer)
            return decode_payload(frame.payload)
        finally:
            if buffer is not None:
                self.ingest.give_back(buffer)


class SecAggFLServer(FLServer):
    handler_class = SecAggHandler
