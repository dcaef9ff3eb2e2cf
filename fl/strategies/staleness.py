"""Buffered asynchronous aggregation's arithmetic (FedBuff: Nguyen et al., AISTATS 2022,
"Federated Learning with Buffered Asynchronous Aggregation"): which updates a buffer
takes, how stale each is, and the weight it is folded with. No tensors, no threads.

An update's *staleness* is the number of server steps between the model version the
client trained from and the version the buffer is applied to: 0 when nothing moved on
meanwhile. A stale update is down-weighted by ``s(staleness)``: ``polynomial`` is the
paper's 1/sqrt(1 + staleness), ``constant`` is 1. Its weight is its sample count
(``weighting="samples"``) or 1 (``"uniform"``), its *mass*, times that factor, and the
buffer's delta is sum(weight x delta) / sum(mass): the paper's sum(s(staleness) x delta) / K
when every mass is 1. The factor is not normalised away, so a buffer of stale updates makes
a shorter step than a fresh one, as in the paper.

It lives with the strategies, not the server, because it is part of how updates are
aggregated: the server (layer 4) and anything under it may use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

STALENESS_RULES = ("polynomial", "constant")
WEIGHTINGS = ("samples", "uniform")


class Stale(ValueError):
    """An update older than ``max_staleness``; ``str(e)`` is the line logged."""


def staleness_factor(staleness: int, rule: str = "polynomial") -> float:
    """``s(staleness)``: (1 + staleness)^-0.5 (polynomial, the paper's default) or 1 (constant)."""
    if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
        raise ValueError(f"staleness must be an int >= 0, got {staleness!r}")
    if rule == "polynomial":
        return (1.0 + staleness) ** -0.5
    if rule == "constant":
        return 1.0
    raise ValueError(f"staleness rule must be one of {', '.join(STALENESS_RULES)}, got {rule!r}")


@dataclass(frozen=True)
class Entry:
    """One update in a buffer: who sent it, from which version, and its weight."""

    client_id: int
    trained_from: int  # the model version the client was sent
    staleness: int
    factor: float  # staleness_factor(staleness)
    mass: float  # samples or 1: its part of the mean's denominator
    weight: float  # mass x factor: its delta's coefficient in the mean's numerator


@dataclass
class Buffer:
    """The updates of one server step: at most ``size``, at most one per client (a client
    twice in one step would double its pull on the mean, and under DP break the
    sensitivity bound), none staler than ``max_staleness`` (None: no limit).
    ``version`` is the model version the step is applied to."""

    size: int
    version: int
    rule: str = "polynomial"
    weighting: str = "samples"
    max_staleness: int | None = None
    entries: list[Entry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"buffer size must be at least 1, got {self.size}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        staleness_factor(0, self.rule)  # checks the rule
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max staleness must be >= 0, got {self.max_staleness}")

    @property
    def full(self) -> bool:
        return len(self.entries) >= self.size

    @property
    def clients(self) -> list[int]:
        return [e.client_id for e in self.entries]

    @property
    def staleness(self) -> list[int]:
        return [e.staleness for e in self.entries]

    def admit(self, client_id: int, trained_from: int, samples: int) -> Entry:
        """The entry an update would take (not added yet); Stale past ``max_staleness``,
        ValueError if the buffer is full, holds this client already, or the version is
        from the future."""
        if self.full:
            raise ValueError(f"the buffer already holds its {self.size} updates")
        if client_id in self.clients:
            raise ValueError(f"client {client_id} already has an update in this buffer")
        staleness = self.version - trained_from
        if staleness < 0:
            raise ValueError(f"trained from version {trained_from}, newer than the current {self.version}")
        if self.max_staleness is not None and staleness > self.max_staleness:
            raise Stale(f"staleness {staleness} (trained from version {trained_from}, now {self.version}) "
                        f"exceeds --max-staleness {self.max_staleness}")
        factor = staleness_factor(staleness, self.rule)
        mass = float(samples) if self.weighting == "samples" else 1.0
        return Entry(client_id, trained_from, staleness, factor, mass, mass * factor)

    def add(self, entry: Entry) -> None:
        if self.full or entry.client_id in self.clients:
            raise ValueError(f"cannot add client {entry.client_id}'s update to this buffer")
        self.entries.append(entry)
