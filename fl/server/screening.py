"""The default guard against a participant's poison: judge each update's size by its peers'.

A scaled, zeroed or exploding update has a delta norm far from the honest ones of the same
round, and a client that claims far more samples than the others pulls the weighted mean
as far. The federation offers each update's weight x L2 norm (its norm alone under uniform
weighting), and :class:`NormScreen` rejects one that exceeds ``ratio`` x the median of the
round's values, while keeping the streaming fold: it holds only the first ``hold``
deltas of a round (until there is a median to judge them by), then judges each new one on
arrival against the median of all norms seen so far. Memory stays ``hold`` models whatever
the number of clients; a norm is one float.

The median is the robust statistic here: with at least three updates, one attacker cannot
move it past the honest norms. With one or two updates there is no majority to judge by,
and everything finite is accepted (``--min-fit`` and the strategies' robust rules are the
tools for that case).
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
    def __init__(self, ratio: float, hold: int = 3) -> None:
        if not ratio > 1:
            raise ValueError(f"norm ratio must be > 1, got {ratio}")
        if hold < 1:
            raise ValueError(f"hold must be >= 1, got {hold}")
        self.ratio, self.hold = ratio, hold
        self.norms: list[float] = []
        self.held: list[tuple[T, float]] = []

    def reset(self) -> None:
        self.norms.clear()
        self.held.clear()

    def offer(self, item: T, norm: float) -> Verdicts[T]:
        """Judge ``item`` (or hold it until there is a median); returns what is decided now,
        the held items included once the median exists."""
        out: Verdicts[T] = Verdicts()
        if not math.isfinite(norm):
            out.rejected.append((item, "update norm is not finite"))
            return out
        self.norms.append(norm)
        self.held.append((item, norm))
        if len(self.norms) >= self.hold:
            self._judge_held(out)
        return out

    def flush(self) -> Verdicts[T]:
        """End of round: judge whatever is still held by the median of all the round's norms."""
        out: Verdicts[T] = Verdicts()
        self._judge_held(out)
        return out

    def bound(self) -> float:
        """The largest norm accepted now (inf while fewer than three norms are known)."""
        if len(self.norms) < 3:
            return math.inf
        median = statistics.median(self.norms)
        return self.ratio * median if median > 0 else math.inf

    def _judge_held(self, out: Verdicts[T]) -> None:
        limit = self.bound()
        for item, norm in self.held:
            if norm <= limit:
                out.accepted.append(item)
            else:
                out.rejected.append((item, f"update size (weight x norm) {norm:.4g} exceeds {self.ratio:g} x "
                                           f"the round's median ({limit / self.ratio:.4g})"))
        self.held.clear()
