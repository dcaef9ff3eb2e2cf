"""Round logic and the session registry: no sockets, no files, no ``torch.save``.

The transport (``transport.py``) asks :meth:`Federation.join` what to tell a client that
joins without its shard (the split, and the lowest free id), registers an authenticated
client as a :class:`Session`,
queues it the rounds it is sampled for, and hands every decoded UPDATE to
:meth:`Federation.submit` (from the ingest thread). The main thread calls
:meth:`Federation.run_round` (sample, broadcast, wait) and :meth:`Federation.finish_round`
(screen, aggregate, apply the strategy's server step, commit). Extension points:

- the strategy (``strategies/``) decides the training config, the fold and the server step;
- :meth:`Federation.contribution` turns a decoded UPDATE into a validated flat delta
  (``contribution.py`` parses and checks it; override it to accept another update format);
- ``screening.NormScreen`` judges each delta's pull on the mean (its weight x its norm)
  against the round's others, so neither a huge delta nor a huge sample claim gets through.

Every error a peer's data can cause ends that peer's update (logged, counted in the
round's ``rejected``) or that round (the previous model kept), never the process.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from typing import Any, Callable

import torch

from fl.common.layout import Layout
from fl.common.logs import sanitize, short_ids
from fl.common.vectors import InvalidUpdate, clip_by_norm
from fl.learning import models
from fl.learning.quantization import QuantizationError, apply_delta, dequantize_state, quantize_state, state_delta
from fl.learning.training import round_lr
from fl.privacy import global_counters
from fl.server.config import ServerConfig
from fl.server.contribution import checked_delta, client_record, parse
from fl.server.sampling import sample_clients
from fl.server.screening import NormScreen
from fl.strategies.base import Aggregator, Strategy
from fl.wire.errors import ProtocolError
from fl.wire.frames import encode_payload
from fl.wire.handshake import Peer, Refused, Terms

log = logging.getLogger("server")


@dataclass
class RoundTask:
    """What a handler needs to serve one round to its client."""

    round: int
    payload: bytes  # the MODEL message with the full state, encoded once for all clients
    base: dict[str, torch.Tensor]  # the state clients train from
    base_floats: torch.Tensor  # the same, flat (deltas are measured from it)
    deadline: float  # time.monotonic() by which the update must have arrived
    view_id: int = 0  # which broadcast this is (--quantize-broadcast)
    compact: bytes | None = None  # the same model as an 8-bit delta to broadcast view_id - 1
    secagg: Any = None  # the round's secure-aggregation coordinator (fl/secagg/coordinator.py), if any
    version: int = 0  # the model version it carries (asynchronous.py: staleness is measured from it)


@dataclass(frozen=True)
class Stop:
    """Queued to a session instead of a round: send DONE with this reason and close."""

    reason: str


@dataclass
class Session:
    """An authenticated client as the round logic sees it. ``hang_up`` is the transport's
    way to close its connection (a newer connection with the same id replaces it)."""

    peer: Peer
    address: str
    hang_up: Callable[[], None] = lambda: None
    tasks: "queue.Queue[Any]" = dc_field(default_factory=queue.Queue)
    view_id: int | None = None  # the last broadcast this client received in full or as a delta
    stopping: str | None = None  # why the federation ended, once it has: a client mid-task is told at once

    @property
    def client_id(self) -> int:
        return self.peer.client_id


@dataclass
class Contribution:
    """A validated update, flat: what the screen judges and the strategy folds."""

    client_id: int
    delta: torch.Tensor  # float32, local floats minus the floats the client trained from
    ints: torch.Tensor  # int64 counters, absolute
    weight: float
    record: dict[str, Any]  # the client's line in the round's metrics


@dataclass
class RoundState:
    number: int
    participants: dict[int, Session]  # the sampled clients
    connected: int
    aggregator: Aggregator
    base_floats: torch.Tensor
    screen: NormScreen[Contribution] | None
    int_sum: torch.Tensor
    int_weight: float = 0.0
    reported: set[int] = dc_field(default_factory=set)
    clients: list[dict[str, Any]] = dc_field(default_factory=list)  # accepted updates' metrics
    rejected: list[dict[str, Any]] = dc_field(default_factory=list)  # client_id, reason
    bytes_up: int = 0
    bytes_down: int = 0
    lr: float = 0.0
    started: float = dc_field(default_factory=time.monotonic)  # broadcast time
    seconds: float = 0.0  # broadcast to last update folded in
    extra: dict[str, Any] = dc_field(default_factory=dict)  # more keys for the round's metrics line
    published: float | None = None  # time.time() when its model was committed (evaluated later)


class Federation:
    """Round logic and shared state; the handlers, the ingest thread and the main thread meet here."""

    def __init__(self, config: ServerConfig, strategy: Strategy,
                 initial_state: dict[str, torch.Tensor] | None = None) -> None:
        self.config = config
        self.strategy = strategy
        state = initial_state or {k: v.detach().clone() for k, v in
                                  models.for_dataset(config.model, config.dataset).state_dict().items()}
        self.layout = Layout.of(state)
        self.terms = Terms(config.model, self.layout.fingerprint, config.dataset)  # in every WELCOME
        self.global_state = self.layout.unflatten(*self.layout.flatten(state))
        self.sessions: dict[int, Session] = {}
        self.split = config.split()  # how the training set is cut into shards, one per client id
        self.assigned: set[int] = set()  # ids given out or seen in this run: never given to another
        self.lock = threading.Condition()
        self.round: RoundState | None = None
        self.stop = threading.Event()
        self.start_round = 0  # the last completed round (a resumed run starts after it)
        self.view: dict[str, torch.Tensor] | None = None  # what clients hold (--quantize-broadcast)
        self.view_id = 0
        self._variances = [e for e in self.layout.entries if e.name.endswith("running_var")]
        self._statistics = [e for e in self.layout.entries if e.name.endswith(("running_mean", "running_var"))]
        # Under DP the strategy clips (its sensitivity bound) and nothing may drop an update
        # for its size relative to the others: that decision would depend on other clients.
        wrapped = getattr(strategy, "clips_updates", False)
        self.clip_norm = None if wrapped else config.clip_norm
        self.norm_ratio = None if wrapped else config.norm_ratio

    # --- called from handler threads ---------------------------------------------------

    def join(self, peer: Peer) -> dict[str, Any]:
        """WELCOME's fields for an authenticated peer: what the run trains (``Terms``), and
        for one that asks to join, the split and its id (the lowest never given out, when it
        brings none). Refused, with the one line the client prints, when its id is outside
        the shards or none is free."""
        if not peer.joining:
            return self.terms.to_wire()
        n = self.split.num_shards
        with self.lock:
            cid = peer.client_id if peer.client_id is not None else self._free_shard()
            if cid >= n:
                log.warning("refused client %d: outside the %d shards (--num-shards %d)", cid, n, n)
                raise Refused(f"client id {cid} is outside this server's {n} shards (--num-shards {n}): "
                              f"pass 0..{n - 1}, or no --client-id to be given a free one")
            self.assigned.add(cid)
        log.info("%s shard %d of %d (%s split) to a joining client", "confirmed" if peer.client_id is not None
                 else "assigned", cid, n, self.split.scheme)
        return {**self.terms.to_wire(), "client_id": cid, "split": self.split.to_wire()}

    def _free_shard(self) -> int:
        """The lowest id neither given out nor connected (called with the lock held)."""
        n = self.split.num_shards
        taken = self.assigned | self.sessions.keys()
        free = next((i for i in range(n) if i not in taken), None)
        if free is not None:
            return free
        gone = sorted(i for i in self.assigned if i < n and i not in self.sessions)
        log.warning("refused a client: all %d shards are taken (--num-shards %d)", n, n)
        rejoin = f"; a client that left can rejoin with --client-id {gone[0]}" if gone else ""
        raise Refused(f"no free shard: all {n} shards of this server are taken (--num-shards {n}){rejoin}")

    def register(self, session: Session) -> None:
        with self.lock:
            old = self.sessions.get(session.client_id)
            self.sessions[session.client_id] = session
            self.assigned.add(session.client_id)
            self.lock.notify_all()
        if old is not None:
            # The newest authenticated connection wins: a restarted client must be able
            # to rejoin before the server notices that its old socket is dead.
            log.warning("client %d reconnected from %s; dropping its old connection from %s",
                        session.client_id, session.address, old.address)
            old.hang_up()
            old.tasks.put(Stop("replaced by a newer connection"))

    def unregister(self, session: Session) -> None:
        with self.lock:
            if self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
            self._report(session, None)

    def is_current(self, session: Session) -> bool:
        return self.sessions.get(session.client_id) is session

    def submit(self, session: Session, task: RoundTask, body: dict[str, Any], up: int, down: int) -> None:
        """Validate one update, screen it and fold it into the round; a bad one is excluded."""
        rnd = self.round
        cid = session.client_id
        try:
            contribution = self.contribution(session, task, body, up)
        except (InvalidUpdate, ProtocolError, ValueError, TypeError) as exc:
            with self.lock:
                if rnd is not None and rnd is self.round and rnd.number == task.round:
                    rnd.bytes_up += up
                    rnd.bytes_down += down
                    self._reject(rnd, cid, sanitize(str(exc)))
                self._report(session, task.round)
            return
        with self.lock:
            if rnd is None or rnd is not self.round or rnd.number != task.round or cid in rnd.reported:
                return  # the round ended (timeout) before this update arrived
            rnd.bytes_up += up
            rnd.bytes_down += down
            if rnd.screen is None:
                self._fold(rnd, contribution)
            else:  # judged by its pull on the mean: weight x norm (the norm alone when uniform)
                self._settle(rnd, rnd.screen.offer(contribution, contribution.weight * contribution.record["norm"]))
            self._report(session, task.round)

    def contribution(self, session: Session, task: RoundTask, body: dict[str, Any], up: int) -> Contribution:
        """The update as a flat delta from the model the client was sent, fully checked
        (``contribution.py``), clipped to --clip-norm, weighted and recorded."""
        update = parse(body, self.layout, task.base, task.round, self.sample_limit(session))
        delta, norm = checked_delta(update, task.base_floats, self._variances)
        if self.clip_norm is not None:
            delta, _ = clip_by_norm(delta, self.clip_norm)
        weight = float(update.num_samples) if self.config.weighting == "samples" else 1.0
        record = client_record(session.client_id, update.num_samples, update.quantized, up, norm, update.metrics)
        return Contribution(session.client_id, delta, update.ints, weight, record)

    def sample_limit(self, session: Session) -> int:
        """The most samples an update may claim: what the client announced, within --max-samples."""
        return min(session.peer.num_samples, self.config.max_samples)

    def _fold(self, rnd: RoundState, c: Contribution) -> None:
        try:
            rnd.aggregator.add(c.delta, c.weight)  # a DP aggregator checks norms and counts too
        except (InvalidUpdate, ValueError) as exc:
            self._reject(rnd, c.client_id, sanitize(str(exc)))
            return
        rnd.int_sum.add_(c.ints.to(torch.float64), alpha=c.weight)
        rnd.int_weight += c.weight
        rnd.clients.append(c.record)

    def _settle(self, rnd: RoundState, verdicts: Any) -> None:
        for c in verdicts.accepted:
            self._fold(rnd, c)
        for c, reason in verdicts.rejected:
            self._reject(rnd, c.client_id, reason)

    def _reject(self, rnd: RoundState, client_id: int, reason: str) -> None:
        log.warning("round %d: rejected update from client %d: %s", rnd.number, client_id, reason)
        rnd.rejected.append({"client_id": client_id, "reason": reason})

    def fail(self, session: Session, round_num: int, down: int, reason: str) -> None:
        log.warning("round %d: client %d dropped out: %s", round_num, session.client_id, sanitize(reason))
        with self.lock:
            if self.round is not None and self.round.number == round_num:
                self.round.bytes_down += down
            self._report(session, round_num)

    def _report(self, session: Session, round_num: int | None) -> None:
        rnd = self.round
        if rnd is not None and rnd.participants.get(session.client_id) is session and \
                round_num in (None, rnd.number):
            rnd.reported.add(session.client_id)
            self.lock.notify_all()

    # --- the main thread ---------------------------------------------------------------

    def wait_for_clients(self) -> dict[int, Session] | None:
        """Wait for --min-clients; after --round-timeout settle for --min-fit."""
        cfg = self.config
        start = time.monotonic()
        last_log = 0.0
        with self.lock:
            while not self.stop.is_set():
                n = len(self.sessions)
                waited = time.monotonic() - start
                if n >= cfg.min_clients or (n >= cfg.min_fit and waited >= cfg.round_timeout):
                    return dict(self.sessions)
                if waited - last_log >= 30 or last_log == 0.0:
                    log.info("waiting for clients: %d of %d connected", n, cfg.min_clients)
                    last_log = max(waited, 1e-9)
                self.lock.wait(timeout=1.0)
        return None

    def run_round(self, number: int, attempt: int = 0) -> RoundState | None:
        """Sample, broadcast, collect until every sampled client reported or the deadline."""
        connected = self.wait_for_clients()
        if connected is None:
            return None
        rnd, task = self.open_round(number, attempt, connected)
        for s in rnd.participants.values():
            s.tasks.put(task)
        self.collect(rnd, task.deadline)
        return rnd

    def open_round(self, number: int, attempt: int, connected: dict[int, Session]) -> tuple[RoundState, RoundTask]:
        """Sample the round's clients and make its broadcast; updates are accepted from now on."""
        cfg = self.config
        sampled = self.sample(number, attempt, connected)
        participants = {cid: connected[cid] for cid in sampled}
        lr = round_lr(cfg.training.lr, number, cfg.rounds, cfg.lr_schedule)
        training = replace(cfg.training_config(number), lr=lr, **self.strategy.fit_config(number))
        config = training.to_wire()
        header = {"round": number, "rounds": cfg.rounds, "config": config,
                  **self.round_extras(number, participants)}
        base, compact = self.broadcast_state()
        payload = encode_payload({**header, "state": base, "view_id": self.view_id})
        if compact is not None:
            compact = encode_payload({**header, "delta": compact, "base_view": self.view_id - 1,
                                      "view_id": self.view_id})
        base_floats = self.layout.flatten(base)[0]
        screen = NormScreen(self.norm_ratio, cfg.screen_hold) if self.norm_ratio else None
        if hasattr(self.strategy, "begin_round"):  # DP: m, the divisor and noise scale
            self.strategy.begin_round(len(participants))
        rnd = RoundState(number, participants, len(connected), self.strategy.aggregator(self.layout.float_numel),
                         base_floats, screen, torch.zeros(self.layout.int_numel, dtype=torch.float64), lr=lr)
        with self.lock:
            self.round = rnd
            # A session that vanished between the snapshot and now counts as reported.
            for cid, s in participants.items():
                if self.sessions.get(cid) is not s:
                    rnd.reported.add(cid)
        task = RoundTask(number, payload, base, base_floats, rnd.started + cfg.round_timeout, self.view_id, compact)
        return rnd, task

    def sample(self, number: int, attempt: int, connected: dict[int, Session]) -> list[int]:
        """The ids that train this attempt of the round (secure aggregation keeps one sample
        across a round's attempts)."""
        cfg = self.config
        seed = None if cfg.dp else cfg.seed  # DP: from the OS CSPRNG, unpredictable (sampling.py)
        return sample_clients(connected, cfg.fraction, cfg.min_fit, seed, number, attempt)

    def round_extras(self, number: int, participants: dict[int, Session]) -> dict[str, Any]:
        """More keys for this round's MODEL message (a subclass's settings); none here."""
        return {}

    def collect(self, rnd: RoundState, deadline: float) -> None:
        """Wait until every sampled client reported (or the deadline), then close the round."""
        with self.lock:
            while len(rnd.reported) < len(rnd.participants) and not self.stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(rnd.participants) - rnd.reported)
                    log.warning("round %d: timed out after %.0f s waiting for %d client(s): %s",
                                rnd.number, self.config.round_timeout, len(missing), short_ids(missing))
                    self.forget(rnd, missing)  # their handlers hang up on them at this same deadline
                    break
                self.lock.wait(timeout=min(remaining, 1.0))
        self.close_round(rnd)

    def forget(self, rnd: RoundState, client_ids: Any) -> None:
        """Unlist participants whose handlers are ending their sessions, so that a retry does
        not sample them before they have unregistered (called with the lock held)."""
        for cid in client_ids:
            if self.sessions.get(cid) is rnd.participants.get(cid):
                del self.sessions[cid]

    def close_round(self, rnd: RoundState) -> None:
        """No more updates for this round; the screen judges what it still holds."""
        with self.lock:
            self.round = None
            if rnd.screen is not None:
                self._settle(rnd, rnd.screen.flush())
        rnd.seconds = time.monotonic() - rnd.started

    def finish_round(self, rnd: RoundState) -> dict[str, torch.Tensor] | None:
        """Aggregate, take the strategy's server step and commit the new global model; None
        (previous model kept) when too few updates arrived or the result is not finite."""
        if len(rnd.clients) < self.config.min_fit:
            log.warning("round %d: only %d of %d updates (need --min-fit %d); retrying the round",
                        rnd.number, len(rnd.clients), len(rnd.participants), self.config.min_fit)
            return None
        try:
            delta = rnd.aggregator.result()
            floats = self.strategy.server_update(rnd.base_floats, delta)
        except (ValueError, RuntimeError) as exc:
            log.error("round %d: aggregation failed (%s); keeping the previous model", rnd.number, exc)
            return None
        if floats.shape != rnd.base_floats.shape or not bool(torch.isfinite(floats).all()):
            log.error("round %d: the aggregate is not finite; dropping the round and keeping the previous model",
                      rnd.number)
            return None
        # BatchNorm's running statistics are averaged, not stepped by the server optimizer:
        # momentum carried the variances below zero, the clamp made them 0, and the next
        # evaluation divided by sqrt(eps) (test loss 325 with fedavgm, momentum 0.5).
        frozen = self.config.bn_frozen(rnd.number)  # FixBN: the statistics stay the global ones
        for e in self._statistics:
            span = slice(e.offset, e.offset + e.numel)
            floats[span] = rnd.base_floats[span].double() + (0 if frozen else delta[span])
        for e in self._variances:  # DP noise may still take a variance below zero
            floats[e.offset:e.offset + e.numel].clamp_(min=0)
        if self.config.dp:  # clients' counters are un-noised: the server keeps its own
            ints = global_counters(self.layout, self.global_state)
        else:
            ints = (rnd.int_sum / rnd.int_weight).round().to(torch.int64)
        self.global_state = self.layout.unflatten(floats, ints)
        rnd.published = time.time()
        return self.global_state

    def broadcast_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """The state clients will train from this round, and its 8-bit delta form.

        With --quantize-broadcast the server keeps the model exactly as clients rebuild it
        (the "view") and sends only quantize(global - view). Clients then train from the
        view, so the quantization error of one broadcast is never compounded by the next:
        each delta is measured from what clients really hold.
        """
        self.view_id += 1
        if not self.config.quantize_broadcast:
            return self.global_state, None
        if self.view is None:
            self.view = self.global_state
            return self.view, None
        try:
            packed = quantize_state(state_delta(self.global_state, self.view))
        except QuantizationError as exc:  # cannot happen to a finite model; never fatal
            log.warning("cannot quantize the broadcast (%s); sending the full model", exc)
            self.view = self.global_state
            return self.view, None
        self.view = apply_delta(self.view, dequantize_state(packed, like=self.view))
        return self.view, packed

    def schedule_state(self) -> dict[str, Any] | None:
        """What a checkpoint must hold of the schedule beyond the round (asynchronous.py's
        version and dispatch count); None for synchronous rounds."""
        return None

    def restore_schedule(self, saved: dict[str, Any] | None) -> None:
        """Take over :meth:`schedule_state` from a checkpoint (after ``start_round`` is set)."""

    def stop_all(self, reason: str) -> None:
        with self.lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            s.stopping = reason
            s.tasks.put(Stop(reason))

    def drain(self, timeout: float) -> int:
        """Wait until every handler has told its client DONE and hung up; how many are left.
        A client busy training is told at once (``ClientHandler.await_update``), so the end
        does not wait for work nobody will use."""
        end = time.monotonic() + timeout
        with self.lock:
            while self.sessions and (left := end - time.monotonic()) > 0:
                self.lock.wait(timeout=min(left, 0.2))
            return len(self.sessions)
