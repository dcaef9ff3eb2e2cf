"""The default guard against a participant's poison: judge each update's size by its peers'.

A scaled, zeroed or exploding update has a delta norm far from the honest ones of the same
round, and a client that claims far more samples than the others pulls the weighted mean
as far. The federation offers each update's weight x L2 norm (its norm alone under uniform
weighting), and :class:`NormScreen` rejects one that exceeds ``ratio`` x a median, while
keeping the streaming fold: it holds the first ``hold`` reports of a round and judges them
by their own median, then judges each later one on arrival against the median of the norms
it has ACCEPTED so far. A refused norm never counts, so refused attackers cannot drag the
median towards their own. Memory stays ``hold`` models whatever the number of clients; a
norm is one float.

The bound, exactly. Let the round's n reports include a from attackers, and its honest
norms lie in [lo, hi] with hi <= ratio x lo (honest updates are within ``ratio`` of each
other: the screen's premise). The median of values fewer than half of which are an
attacker's lies in [lo, hi]. If the attackers are fewer than half of the first
min(hold, n) reports, the median of those is in [lo, hi] and every honest one among them
is accepted; after that the accepted honest updates only grow in number, so while the
accepted attackers stay fewer than them, the median of the accepted norms stays in
[lo, hi]. Then every honest update is accepted and none above ratio x hi is, whatever the
attackers report and wherever they report it, whenever a < min(hold, n) / 2: with the
default hold of 11 (``ServerConfig.screen_hold``), up to 5 colluding ids in a round of
any size above 10 (and fewer than half of a smaller round). Attackers that are at least
half of the first min(hold, n) reports set the median themselves; so can ones that come
to outnumber the honest updates accepted before them. A round of one or two updates has
no majority to judge by: everything finite is accepted (``--min-fit`` and the strategies'
robust rules are the tools for that case).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Verdicts(Generic[T]):
    accepted: list[T] = field(default_factory=list)
    rejected: list[tuple[T, str]] = field(default_factory=list)  # (item, one-line reason)


class NormScreen(Generic[T]):
    def __init__(self, ratio: float, hold: int) -> None:
        if not ratio > 1:
            raise ValueError(f"norm ratio must be > 1, got {ratio}")
        if hold < 3:
            raise ValueError(f"hold must be >= 3 (a median needs a majority), got {hold}")
        self.ratio, self.hold = ratio, hold
        self.norms: list[float] = []  # the accepted updates' norms
        self.held: list[tuple[T, float]] = []
        self.judging = False  # the first ``hold`` reports have been judged: each new one is judged at once

    def reset(self) -> None:
        self.norms.clear()
        self.held.clear()
        self.judging = False

    def offer(self, item: T, norm: float) -> Verdicts[T]:
        """Judge ``item`` (or hold it until there is a median); returns what is decided now,
        the held items included once the median exists."""
        out: Verdicts[T] = Verdicts()
        if not math.isfinite(norm):
            out.rejected.append((item, "update norm is not finite"))
            return out
        self.held.append((item, norm))
        if self.judging:
            self._judge_held(out, self.norms)
        elif len(self.held) >= self.hold:
            self.judging = True
            self._judge_held(out, [n for _, n in self.held])
        return out

    def flush(self) -> Verdicts[T]:
        """End of round: judge whatever is still held (a round of fewer than ``hold``
        reports) by the median of those reports."""
        out: Verdicts[T] = Verdicts()
        self._judge_held(out, self.norms if self.judging else [n for _, n in self.held])
        return out

    def bound(self, norms: list[float] | None = None) -> float:
        """The largest norm ``norms`` (default: the accepted ones) admit: ratio x their
        median; inf while there are fewer than three (no majority to judge by)."""
        norms = self.norms if norms is None else norms
        if len(norms) < 3:
            return math.inf
        median = statistics.median(norms)
        return self.ratio * median if median > 0 else math.inf

    def _judge_held(self, out: Verdicts[T], reference: list[float]) -> None:
        limit = self.bound(reference)
        for item, norm in self.held:
            if norm <= limit:
                out.accepted.append(item)
                self.norms.append(norm)
            else:
                out.rejected.append((item, f"update size (weight x norm) {norm:.4g} exceeds {self.ratio:g} x "
                                           f"the round's median ({limit / self.ratio:.4g})"))
        self.held.clear()
