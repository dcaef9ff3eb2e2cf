"""How much privacy the rounds so far have spent: (epsilon, delta) from dp-accounting's RDP accountant.

No privacy formula is written here: Google's ``dp-accounting`` (the accountant behind TF
Privacy and TFF) composes the rounds, and this class only says which mechanism each round was.

**The event.** A round samples m of the n clients connected at that moment, uniformly and
without replacement from a source nobody can predict (``server.sampling``: the OS CSPRNG
under DP), and releases the sum of their clipped deltas plus N(0, (z C)^2), scaled by 1/m.
With a fixed sample size the natural neighbouring relation is *replace one client*
(REPLACE_ONE), the only one dp-accounting's RDP accountant supports for
``SampledWithoutReplacementDpEvent`` (Wang, Balle, Kasiviswanathan 2019, "Subsampled Renyi
DP and analytical moments accountant", Thm. 27). Replacing a client can move the sum by 2C
(from one clipped delta to its opposite), so the Gaussian's multiplier relative to that
sensitivity is z / 2. That is ``sampling="fixed"``, the default, and the event that matches
what the server does.

**The rate actually realised.** The server records each released round with the m and n
of that round (:meth:`PrivacyAccountant.step`), not the population it was told to expect:
a run that goes on with 3 connected clients after a timeout samples all 3, and that round
is charged as q = 1 (no amplification). Rounds of different (z, n, m) are different events,
composed by the library; m = n is the plain Gaussian. The declared N and m
(``num_clients``, ``clients_per_round``) only set the default delta and the planned rate
(:meth:`epsilon_after`; the server checks ``--target-epsilon`` at it before a round starts,
and again at the realised rate, :meth:`epsilon_if`, before the round is released).

``sampling="poisson"`` is ``PoissonSampledDpEvent(m / n, Gaussian(z))`` under add/remove
one client: exact for a server that includes each client independently with probability
q (McMahan et al. 2018 analyse DP-FedAvg that way), an *approximation* for fixed-size
sampling. Its epsilon is much smaller (e.g. N=100, m=10, z=1, 100 rounds, delta=1/N^1.1:
4.6 against 77 for the fixed-size bound). Report the relation with the number.

Adaptive clipping (``privacy.adaptive_clipping``) releases two Gaussians per round whose
composition is exactly one Gaussian of multiplier z, so it is accounted with z too.
z = 0 (clipping only) is dp-accounting's ``NonPrivateDpEvent``: epsilon is infinite.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import dp_accounting
from dp_accounting import rdp
from dp_accounting.privacy_accountant import NeighboringRelation

SAMPLING_MODES = ("fixed", "poisson")


def default_delta(num_clients: int) -> float:
    """delta = 1 / N^1.1: below 1/N, so the guarantee cannot be met by releasing one client's
    data outright (McMahan et al. 2018 use delta ~ 1/N^1.1 too)."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 2:
        raise ValueError(f"default delta needs at least 2 clients, got {num_clients!r}")
    return num_clients ** -1.1


def _check_rate(population: object, sampled: object) -> None:
    if isinstance(population, bool) or not isinstance(population, int) or population < 1:
        raise ValueError(f"number of clients must be a positive int, got {population!r}")
    if isinstance(sampled, bool) or not isinstance(sampled, int) or not 1 <= sampled <= population:
        raise ValueError(f"clients per round must be in 1..{population}, got {sampled!r}")


def _check_multiplier(z: object) -> float:
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not (math.isfinite(z) and z >= 0):
        raise ValueError(f"noise multiplier must be >= 0, got {z!r}")
    return float(z)


class PrivacyAccountant:
    """Epsilon spent by the released rounds, each with its own z, n connected and m sampled.

    The server calls :meth:`step` once per released noised aggregate (not for a round that
    was abandoned before release), :meth:`epsilon` for the log, and :meth:`epsilon_if` /
    :meth:`epsilon_after` for ``--target-epsilon``. The rounds live in the checkpoint
    (:meth:`state_dict`); a resumed run loads them and adds its own, even at another z.
    """

    def __init__(self, noise_multiplier: float, num_clients: int, clients_per_round: int,
                 delta: float | None = None, sampling: str = "fixed") -> None:
        self.noise_multiplier = _check_multiplier(noise_multiplier)
        _check_rate(num_clients, clients_per_round)
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}")
        self.num_clients = num_clients  # declared: the default delta and the planned rate
        self.clients_per_round = clients_per_round
        self.delta = default_delta(num_clients) if delta is None else float(delta)
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        self.sampling = sampling
        self.released: dict[tuple[float, int, int], int] = {}  # (z, n, m) -> rounds released at it
        self._composed = self._library()
        self._ahead: dict[tuple[int, int, int], Any] = {}  # (n, m, rounds) -> composed further

    @property
    def rounds(self) -> int:
        return sum(self.released.values())

    @property
    def neighboring_relation(self) -> NeighboringRelation:
        return NeighboringRelation.REPLACE_ONE if self.sampling == "fixed" else NeighboringRelation.ADD_OR_REMOVE_ONE

    def _library(self) -> rdp.RdpAccountant:
        return rdp.RdpAccountant(neighboring_relation=self.neighboring_relation)

    def round_event(self, population: int, sampled: int, noise_multiplier: float | None = None) -> dp_accounting.DpEvent:
        """One round that sampled ``sampled`` of ``population`` clients, as a DpEvent."""
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        if z == 0:
            return dp_accounting.NonPrivateDpEvent()
        if self.sampling == "fixed":
            # REPLACE_ONE: one client swapped for another moves the sum by up to 2C.
            return dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, dp_accounting.GaussianDpEvent(z / 2))
        return dp_accounting.PoissonSampledDpEvent(sampled / population, dp_accounting.GaussianDpEvent(z))

    def _composed_with(self, population: int, sampled: int, rounds: int) -> rdp.RdpAccountant:
        """The released rounds plus ``rounds`` more at this rate (memoised until the next step)."""
        _check_rate(population, sampled)
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        if rounds == 0:
            return self._composed
        key = (population, sampled, rounds)
        if key not in self._ahead:
            ahead = copy.deepcopy(self._composed)
            ahead.compose(self.round_event(population, sampled), rounds)
            self._ahead[key] = ahead
        return self._ahead[key]

    def step(self, population: int, sampled: int) -> None:
        """Record one released round that sampled ``sampled`` of the ``population`` connected."""
        self._composed = self._composed_with(population, sampled, 1)
        self._ahead.clear()
        key = (self.noise_multiplier, population, sampled)
        self.released[key] = self.released.get(key, 0) + 1

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` of the rounds recorded so far (inf if any had no noise)."""
        return float(self._composed.get_epsilon(self.delta))

    def epsilon_if(self, population: int, sampled: int, rounds: int = 1) -> float:
        """Epsilon if ``rounds`` more rounds sampling ``sampled`` of ``population`` were released."""
        return float(self._composed_with(population, sampled, rounds).get_epsilon(self.delta))

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon after ``rounds`` rounds in all, the ones still to come at the declared m of N."""
        if rounds < self.rounds:
            raise ValueError(f"{self.rounds} rounds are already recorded, asked for {rounds}")
        return self.epsilon_if(self.num_clients, self.clients_per_round, rounds - self.rounds)

    def describe(self) -> str:
        """One line for the log: what is being accounted, and how."""
        relation = "replace-one" if self.sampling == "fixed" else "add/remove-one"
        how = "m of n without replacement" if self.sampling == "fixed" else "Poisson sampling at q = m/n"
        return (f"privacy: epsilon at delta={self.delta:.3g} for {relation} client, RDP accountant "
                f"(dp-accounting), z={self.noise_multiplier:g}, {how} with the m sampled and n connected "
                f"of each round (planned m={self.clients_per_round}, N={self.num_clients})")

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the sampling mode, delta and every (z, n, m, rounds) released."""
        return {"sampling": self.sampling, "delta": self.delta,
                "released": [[z, n, m, count] for (z, n, m), count in self.released.items()]}

    def load_state_dict(self, state: Any) -> None:
        """Take over the rounds a checkpoint released, each at the z it was noised with (a
        changed --dp-noise-multiplier is accounted, not re-accounted with this run's). A
        checkpoint accounted under another sampling mode is refused: its neighbouring
        relation differs, and the two do not compose. Epsilon is then reported at this
        run's delta (valid for the whole composition)."""
        if not isinstance(state, dict) or not isinstance(state.get("released"), list):
            raise ValueError("the privacy accountant state is malformed")
        if state.get("sampling") != self.sampling:
            raise ValueError(f"its rounds were accounted with sampling={state.get('sampling')!r}, "
                             f"this run has {self.sampling!r}")
        released: dict[tuple[float, int, int], int] = {}
        for item in state["released"]:
            if not isinstance(item, list) or len(item) != 4:
                raise ValueError(f"the privacy accountant holds a malformed round record: {item!r}"[:200])
            z, population, sampled, count = item
            _check_rate(population, sampled)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"the privacy accountant holds an invalid round count: {count!r}")
            key = (_check_multiplier(z), population, sampled)
            released[key] = released.get(key, 0) + count
        composed = self._library()
        for (z, population, sampled), count in released.items():
            composed.compose(self.round_event(population, sampled, z), count)
        self.released, self._composed = released, composed
        self._ahead.clear()
