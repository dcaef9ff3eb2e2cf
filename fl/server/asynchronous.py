"""Buffered asynchronous aggregation (``--mode async``; FedBuff, Nguyen et al., AISTATS 2022):
no step waits for the slowest client. No sockets, no files.

:class:`AsyncFederation` is a ``Federation`` whose "round" is a server step. Up to
``--concurrency`` clients train at once, each sent the newest model version; a slot freed by
an update (or a failure) is filled at once with an idle client drawn as rounds are
(``sampling.sample_one``: seeded, or the OS CSPRNG under DP). Each MODEL carries its own
dispatch number as its "round", so a client's training seed (seed, client, round) differs
from one dispatch to the next and a current ``client.py`` needs no change. An update is
checked exactly as in a round (``Federation.contribution``), then takes its place in the
step's :class:`fl.strategies.staleness.Buffer` (staleness, weight, ``--max-staleness``),
its delta scaled by its staleness factor, then the norm screen and the strategy's aggregator. Once ``--buffer-size`` updates are in, the
main thread applies the strategy's server step (``Federation.finish_round``), which
publishes version = step number, and the evaluator writes its line in the background.

Updates that arrive while the main thread applies a step wait in ``pending`` and enter the
next buffer: its staleness is measured from the version that buffer is applied to, and its
aggregator is made after the previous step's release (adaptive DP clipping moves C there).
A client is sent nothing while its update is in flight, pending or in the open buffer, so
a buffer holds at most one update per client.

``--quantize-broadcast``: the server keeps the last few models clients hold (``views``,
``2 x concurrency + 2`` of them) and sends a client that holds one of them only the 8-bit
delta from it to the newest version; the client trains from what it rebuilds, which the
server records as a new view, so no quantization error is compounded.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from fl.common.logs import sanitize
from fl.common.vectors import InvalidUpdate
from fl.learning.quantization import QuantizationError, apply_delta, dequantize_state, quantize_state, state_delta
from fl.learning.training import round_lr
from fl.server.federation import Contribution, Federation, RoundState, RoundTask, Session
from fl.server.sampling import sample_one
from fl.server.screening import NormScreen
from fl.strategies.staleness import Buffer
from fl.wire.errors import ProtocolError
from fl.wire.frames import encode_payload

log = logging.getLogger("server")


@dataclass
class Step(RoundState):
    """One server step: a RoundState whose participants are the clients in its buffer."""

    buffer: Buffer | None = None


@dataclass
class Arrival:
    """An update back from a dispatch: its checked contribution, or why it was refused."""

    session: Session
    task: RoundTask
    outcome: Contribution | str
    up: int
    down: int


class AsyncFederation(Federation):
    """The asynchronous schedule around the same sessions, checks and strategies."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.version = 0  # the committed model's version: server steps applied
        self.dispatched = 0  # MODEL messages sent; each one's number is its "round"
        self.inflight: dict[int, tuple[Session, RoundTask]] = {}
        self.pending: list[Arrival] = []
        self.views: collections.OrderedDict[int, dict[str, torch.Tensor]] = collections.OrderedDict()
        self._current: tuple[int, int, torch.Tensor] | None = None  # (version, its view id, its floats)

    # --- called from handler and ingest threads ------------------------------------------

    def submit(self, session: Session, task: RoundTask, body: dict[str, Any], up: int, down: int) -> None:
        """Check one update and queue it for the open buffer (folded at once when one is open)."""
        try:
            outcome: Contribution | str = self.contribution(session, task, body, up)
        except (InvalidUpdate, ProtocolError, ValueError, TypeError) as exc:
            outcome = sanitize(str(exc))
        with self.lock:
            if self._drop(session.client_id, task) is None:
                return  # dropped meanwhile: the client reconnected
            self.pending.append(Arrival(session, task, outcome, up, down))
            if self.round is not None:
                self._fold_pending(self.round)

    def fail(self, session: Session, round_num: int, down: int, reason: str) -> None:
        log.warning("dispatch %d: client %d dropped out: %s", round_num, session.client_id, sanitize(reason))
        with self.lock:
            held = self.inflight.get(session.client_id)
            if held is not None and held[0] is session and self._drop(session.client_id, held[1]) is not None:
                if self.round is not None:
                    self.round.bytes_down += down
            if self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]  # its handler is ending the session: send it nothing more

    def unregister(self, session: Session) -> None:
        with self.lock:
            if self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
            held = self.inflight.get(session.client_id)
            if held is not None and held[0] is session:
                self._drop(session.client_id, held[1])

    def _drop(self, client_id: int, task: RoundTask) -> RoundTask | None:
        """Free the slot of ``task`` if it is still the client's dispatch (lock held)."""
        held = self.inflight.get(client_id)
        if held is None or held[1] is not task:
            return None
        del self.inflight[client_id]
        self.lock.notify_all()
        return task

    # --- the main thread -------------------------------------------------------------------

    def run_round(self, number: int, attempt: int = 0) -> Step | None:
        """Keep the slots full until step ``number``'s buffer is; None if the run stops first."""
        if self.wait_for_clients() is None:
            return None
        rnd = self.open_step(number)
        idle_since = time.monotonic()
        with self.lock:
            self.round = rnd
            self._fold_pending(rnd)
            while not rnd.buffer.full and not self.stop.is_set():
                self._fill_slots(rnd)
                if self.inflight:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= self.config.round_timeout:
                    log.warning("step %d: nothing in flight and no idle client for %.0f s; applying %d of %d updates",
                                number, self.config.round_timeout, len(rnd.buffer.entries), rnd.buffer.size)
                    break
                self.lock.wait(timeout=1.0)
        self.close_round(rnd)
        return rnd

    def open_step(self, number: int) -> Step:
        """An empty buffer for step ``number``, applied to the current version."""
        cfg = self.config
        if number != self.version + 1:
            raise RuntimeError(f"step {number} does not follow version {self.version}")
        if hasattr(self.strategy, "begin_round"):  # DP: the divisor and noise scale are per buffer of K
            self.strategy.begin_round(cfg.buffer_size)
        screen = NormScreen(self.norm_ratio, cfg.screen_hold) if self.norm_ratio else None
        rnd = Step(number, {}, len(self.sessions), self.strategy.aggregator(self.layout.float_numel),
                   self.layout.flatten(self.global_state)[0], screen,
                   torch.zeros(self.layout.int_numel, dtype=torch.float64),
                   lr=round_lr(cfg.training.lr, number, cfg.rounds, cfg.lr_schedule))
        rnd.buffer = Buffer(cfg.buffer_size, self.version, cfg.staleness_weight, cfg.weighting, cfg.max_staleness)
        return rnd

    def _fill_slots(self, rnd: Step) -> None:
        """Send the newest model to idle clients until --concurrency train (lock held)."""
        busy = set(self.inflight) | set(rnd.buffer.clients) | {a.session.client_id for a in self.pending}
        idle = [cid for cid in self.sessions if cid not in busy]
        seed = None if self.config.dp else self.config.seed  # DP: a secret sample (sampling.py)
        while len(self.inflight) < self.config.concurrency and idle:
            cid = sample_one(idle, seed, self.dispatched + 1)
            idle.remove(cid)
            self._dispatch(self.sessions[cid])

    def _dispatch(self, session: Session) -> None:
        """Queue one client the newest version, numbered as a round of its own (lock held)."""
        cfg = self.config
        self.dispatched += 1
        step = self.version + 1  # what its update will help make: the round its settings are for
        lr = round_lr(cfg.training.lr, step, cfg.rounds, cfg.lr_schedule)
        training = replace(cfg.training_config(step), lr=lr, **self.strategy.fit_config(step))
        header = {"round": self.dispatched, "rounds": cfg.rounds, "config": training.to_wire(),
                  "version": self.version}
        base, floats, model = self.broadcast_for(session)
        task = RoundTask(self.dispatched, encode_payload({**header, **model}), base, floats,
                         time.monotonic() + cfg.round_timeout, model["view_id"], version=self.version)
        self.inflight[session.client_id] = (session, task)
        session.tasks.put(task)

    def broadcast_for(self, session: Session) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
        """The state a client will train from, flat too, and the MODEL's model fields: the
        8-bit delta from the view it holds when it holds a recent one (--quantize-broadcast),
        else the whole model (lock held)."""
        if self._current is None or self._current[0] != self.version:
            self.view_id += 1
            self._current = (self.version, self.view_id, self.layout.flatten(self.global_state)[0])
            self._remember(self.view_id, self.global_state)
        _, current_id, current_floats = self._current
        whole = {"state": self.global_state, "view_id": current_id}
        held = self.views.get(session.view_id) if self.config.quantize_broadcast else None
        if held is None or session.view_id == current_id:
            return self.global_state, current_floats, whole
        try:
            packed = quantize_state(state_delta(self.global_state, held))
        except QuantizationError as exc:  # cannot happen to a finite model; never fatal
            log.warning("cannot quantize the broadcast (%s); sending the full model", exc)
            return self.global_state, current_floats, whole
        self.view_id += 1
        rebuilt = self._remember(self.view_id, apply_delta(held, dequantize_state(packed, like=held)))
        return rebuilt, self.layout.flatten(rebuilt)[0], {"delta": packed, "base_view": session.view_id,
                                                          "view_id": self.view_id}

    def _remember(self, view_id: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.views[view_id] = state
        while len(self.views) > 2 * self.config.concurrency + 2:
            self.views.popitem(last=False)
        return state

    def _fold_pending(self, rnd: Step) -> None:
        """Move arrived updates into the open buffer, oldest first, until it is full (lock held)."""
        while self.pending and not rnd.buffer.full:
            a = self.pending.pop(0)
            cid = a.session.client_id
            rnd.bytes_up += a.up
            rnd.bytes_down += a.down
            if isinstance(a.outcome, str):
                self._reject(rnd, cid, a.outcome)
                continue
            c = a.outcome
            try:
                entry = rnd.buffer.admit(cid, a.task.version, c.record["samples"])
            except ValueError as exc:  # Stale past --max-staleness: the one line logged
                self._reject(rnd, cid, str(exc))
                continue
            rnd.buffer.add(entry)
            rnd.participants[cid] = a.session
            c.delta = self._rebased(c.delta, entry.factor, a.task.base_floats, rnd.base_floats)
            c.weight = entry.mass  # the mean divides by the masses: the factor is not normalised away
            c.record.update(version=a.task.version, staleness=entry.staleness, factor=entry.factor,
                            weight=entry.weight)
            if rnd.screen is None:
                self._fold(rnd, c)
            else:  # judged within the buffer by its pull on the mean, weight x norm
                self._settle(rnd, rnd.screen.offer(c, entry.weight * c.record["norm"]))
        self.lock.notify_all()

    def _rebased(self, delta: torch.Tensor, factor: float, trained_from: torch.Tensor,
                 applied_to: torch.Tensor) -> torch.Tensor:
        """The delta scaled by its staleness factor, but its BatchNorm statistics made the
        client's own, measured from the model the step is applied to: the step then averages
        the clients' statistics, as a round does. A stale statistics delta added to a newer
        model would count the move from the older one twice (the test loss went to 300 when
        the first step's updates arrived one version late)."""
        out = delta * factor
        for e in self._statistics:
            span = slice(e.offset, e.offset + e.numel)
            out[span] = delta[span] + (trained_from[span] - applied_to[span])
        return out

    def _reject(self, rnd: RoundState, client_id: int, reason: str) -> None:
        log.warning("step %d: rejected update from client %d: %s", rnd.number, client_id, reason)
        rnd.rejected.append({"client_id": client_id, "reason": reason})

    def close_round(self, rnd: RoundState) -> None:
        """The buffer takes no more updates; the screen judges what it still holds."""
        super().close_round(rnd)
        with self.lock:
            rnd.connected = len(self.sessions)  # the n the accountant charges this step at
        rnd.extra = {"version": rnd.number, "staleness": [c["staleness"] for c in rnd.clients],
                     "buffer": [c["client_id"] for c in rnd.clients]}

    def finish_round(self, rnd: RoundState) -> dict[str, torch.Tensor] | None:
        """Apply the buffer through the strategy's server step; the new version is the step number."""
        state = super().finish_round(rnd)
        rnd.aggregator = rnd.screen = None  # type: ignore[assignment]  # its line waits for the evaluator: not its sum
        if state is not None:
            with self.lock:
                self.version = rnd.number
                self.lock.notify_all()
        return state

    # --- checkpoints ---------------------------------------------------------------------------

    def schedule_state(self) -> dict[str, Any]:
        return {"mode": "async", "version": self.version, "dispatched": self.dispatched}

    def restore_schedule(self, saved: dict[str, Any] | None) -> None:
        """Continue from the checkpoint's version; number dispatches after its last one (a
        synchronous checkpoint's rounds each used one number), so no training seed repeats."""
        self.version = self.start_round
        self.dispatched = self.start_round
        if saved is None:
            return
        version, dispatched = saved.get("version"), saved.get("dispatched")
        if version != self.start_round or type(dispatched) is not int or dispatched < version:
            raise ValueError(f"its schedule (version {version!r}, dispatched {dispatched!r}) does not match "
                             f"its step {self.start_round}")
        self.dispatched = dispatched
