"""One secure-aggregation round between the server's handler threads: stage barriers
around a ``secagg.SecAggServer``. No sockets, no model: messages in, messages out.

Each sampled client's handler thread calls :meth:`SecAggRound.submit` with its client's
message of the open stage, then :meth:`SecAggRound.wait` for its answer (the key list,
the shares routed to it, the survivor list), which comes once the stage is closed. One
driver thread (the server's main thread, :meth:`SecAggRound.run`) closes each stage when
every live client it waits for has answered, or at the stage's deadline, whichever is
first; a handler whose connection died calls :meth:`SecAggRound.drop`, so nobody waits for
a client that is gone. A stage that closes with too few clients aborts the round
(``SecAggAbort``), and so does any other error of the core while the driver closes a stage
(a ``SecAggError`` or ``ValueError`` there must never end the server): every waiting
handler gets a :class:`Left` with the reason, and :meth:`run` returns None. A message that
proves its sender cheated (``SecAggCheat``), and an abort that names its culprits, put
them in :attr:`cheaters` for the caller to exclude (an abort's unproven ``suspects`` in
:attr:`suspects`). Otherwise :meth:`run` returns the ring
sum of the survivors' inputs, and :attr:`metadata` holds what each survivor sent in clear
beside its masked input.

Deadlines: stages 0 and 1 (keys and shares, small messages, no training) and stage 3
(unmasking) get ``stage_timeout`` from their opening; stage 2 (the masked input, which
the clients train for) runs to the round's deadline (``--round-timeout`` after the
broadcast). Stages 0-2 end at the round's deadline at the latest.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from fl.common.logs import short_ids
from fl.secagg import SecAggAbort, SecAggCheat, SecAggConfig, SecAggError, SecAggServer

log = logging.getLogger("server")
STAGES = ("AdvertiseKeys", "ShareKeys", "MaskedInput", "Unmasking")
WAIT_GRACE_S = 30.0  # a handler stops waiting this long after a stage's deadline, driver or not


@dataclass(frozen=True)
class Left:
    """This client's part in the round is over (aborted, or left out); the reason is one line."""

    reason: str


class RoundClosed(Exception):
    """A message for a stage that has closed, or for a round that has ended."""


class SecAggRound:
    """The coordinator of one round; thread-safe. ``clock`` is ``time.monotonic``."""

    def __init__(self, config: SecAggConfig, round_id: int, participants: Iterable[int], *, start: float,
                 round_deadline: float, stage_timeout: float, graph_seed: bytes | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.round = round_id
        self.server = SecAggServer(config, round_id, graph_seed=graph_seed)
        self.participants = frozenset(participants)
        self.round_deadline = round_deadline
        self.stage_timeout = stage_timeout
        self.clock = clock
        self.cond = threading.Condition()
        self.stage = 0  # the open stage; 4 once the last has closed
        self.deadlines = {0: min(start + stage_timeout, round_deadline)}
        self.answered: list[set[int]] = [set() for _ in STAGES]
        self.replies: dict[int, dict[int, Any]] = {}  # stage -> client -> its answer
        self.dropped: dict[int, str] = {}  # client -> why (connection lost, bad message, timed out)
        self.timed_out: set[int] = set()  # clients still expected when a stage's deadline passed
        self.metadata: dict[int, Any] = {}  # what each client sent in clear with its masked input
        self.bytes_up: dict[int, int] = {}
        self.bytes_down: dict[int, int] = {}
        self.failure: str | None = None
        self.cheaters: dict[int, str] = {}  # client -> what it did (proven by its own messages)
        self.suspects: set[int] = set()  # dealers of shares their holders could not open (unproven)

    # --- handler threads ----------------------------------------------------------------

    def deadline(self, stage: int) -> float:
        """When ``stage`` closes at the latest (known once the stage before has closed)."""
        with self.cond:
            return self.deadlines.get(stage, self.round_deadline)

    def submit(self, client_id: int, stage: int, msg: Any, metadata: Any = None) -> None:
        """Hand a client's message of ``stage`` to the core. SecAggError: the message is
        refused and nothing changed (the caller drops the client); RoundClosed: too late."""
        with self.cond:
            self._check_open(client_id, stage)
            if stage == 0 and client_id not in self.participants:
                raise SecAggError(f"client {client_id} was not sampled for this round")
            try:
                self._receive(client_id, stage, msg, metadata)
            except SecAggCheat as exc:
                self.cheaters.setdefault(exc.client, str(exc))
                raise
            self.answered[stage].add(client_id)
            self.cond.notify_all()

    def _receive(self, client_id: int, stage: int, msg: Any, metadata: Any) -> None:
        s = self.server
        if stage == 0:
            s.receive_keys(client_id, msg)
        elif stage == 1:
            s.receive_shares(client_id, msg)
        elif stage == 2:
            s.receive_masked(client_id, msg)
            self.metadata[client_id] = metadata
        else:
            s.receive_unmask(client_id, msg)

    def _check_open(self, client_id: int, stage: int) -> None:
        if self.failure is not None:
            raise RoundClosed(f"round aborted: {self.failure}")
        if client_id in self.dropped:
            raise RoundClosed(f"client {client_id} has left the round ({self.dropped[client_id]})")
        if stage != self.stage:
            raise RoundClosed(f"stage {STAGES[stage]} is closed" if stage < self.stage
                              else f"stage {STAGES[stage]} is not open yet")

    def wait(self, client_id: int, stage: int) -> Any:
        """Block until ``stage`` closes: this client's answer, or :class:`Left`."""
        with self.cond:
            while self.stage <= stage and self.failure is None:
                late = self.clock() - self.deadlines.get(stage, self.round_deadline)
                if late > WAIT_GRACE_S:  # the driver is gone: never hang a handler
                    return Left(f"stage {STAGES[stage]} did not close")
                self.cond.wait(timeout=1.0)
            if self.failure is not None:
                return Left(f"round aborted: {self.failure}")
            if client_id in self.dropped:
                return Left(self.dropped[client_id])
            reply = self.replies.get(stage, {}).get(client_id)
            if reply is None:
                return Left(self._left_out(stage))
            return reply

    def _left_out(self, stage: int) -> str:
        if stage == 1:
            return "left out: too few members of this client's group shared keys"
        return f"left out at stage {STAGES[stage]}"

    def drop(self, client_id: int, reason: str) -> None:
        """The client is gone (connection lost, timed out, bad message): never wait for it."""
        with self.cond:
            self.dropped.setdefault(client_id, reason)
            self.cond.notify_all()

    def count_bytes(self, client_id: int, up: int, down: int) -> None:
        with self.cond:
            self.bytes_up[client_id] = self.bytes_up.get(client_id, 0) + up
            self.bytes_down[client_id] = self.bytes_down.get(client_id, 0) + down

    # --- the driver ---------------------------------------------------------------------

    def pending(self, stage: int) -> set[int]:
        """Clients whose message of ``stage`` is still expected (caller holds the lock)."""
        if stage == 0:
            expected = set(self.participants)
        else:
            expected = set(self.server.waiting_for or ())
        return expected - self.answered[stage] - set(self.dropped)

    def run(self, stop: threading.Event | None = None) -> torch.Tensor | None:
        """Drive the four stages; the ring sum of the survivors' inputs, or None when the
        round aborted (``failure`` says why)."""
        opened = self.clock()
        for stage in range(len(STAGES)):
            with self.cond:
                while True:
                    if stop is not None and stop.is_set():
                        self._fail(RuntimeError("the server is stopping"))
                        return None
                    pending = self.pending(stage)
                    left = self.deadlines[stage] - self.clock()
                    if not pending or left <= 0:
                        break
                    self.cond.wait(timeout=min(left, 0.5))
                if pending:
                    self.timed_out |= pending
                    for cid in pending:
                        self.dropped.setdefault(cid, f"timed out at stage {STAGES[stage]}")
                    log.warning("round %d: secure aggregation stage %s closed at its deadline without %d "
                                "client(s): %s", self.round, STAGES[stage], len(pending), short_ids(sorted(pending)))
                log.debug("round %d: stage %s closed after %.3f s with %d answers", self.round, STAGES[stage],
                          self.clock() - opened, len(self.answered[stage]))
                opened = self.clock()
                if stage == 3:
                    self.stage = 4  # closed: nothing more is accepted; finish outside the lock
                    self.cond.notify_all()
                    break
                try:
                    self._close(stage)
                except (SecAggAbort, ValueError) as exc:  # ValueError: SecAggError, or the core's own checks
                    self._fail(exc)
                    return None
                self.stage = stage + 1
                start = self.clock()
                self.deadlines[stage + 1] = (self.round_deadline if stage + 1 == 2
                                             else start + self.stage_timeout if stage + 1 == 3
                                             else min(start + self.stage_timeout, self.round_deadline))
                self.cond.notify_all()
        try:
            total = self.server.finish()
        except (SecAggAbort, ValueError) as exc:  # never out of the driver: the server goes on
            self._fail(exc)
            return None
        log.debug("round %d: unmasked the sum in %.3f s", self.round, self.clock() - opened)
        return total

    def _close(self, stage: int) -> None:
        s = self.server
        if stage == 0:
            keys = s.broadcast_keys()
            self.replies[0] = {u: keys for u in s.advertised}
        elif stage == 1:
            self.replies[1] = s.route_shares()
        else:
            request = s.request_unmask()
            self.replies[2] = {u: request for u in s.survivors}

    def _fail(self, exc: Exception) -> None:
        with self.cond:  # reentrant: also called with the lock held
            self.failure = str(exc) if isinstance(exc, SecAggAbort) else f"round {self.round}: {exc}"
            for cid in getattr(exc, "culprits", ()):
                self.cheaters.setdefault(cid, self.failure)
            self.suspects.update(getattr(exc, "suspects", ()))
            self.cond.notify_all()
