"""How much privacy the rounds so far have spent: (epsilon, delta) from dp-accounting's RDP accountant.

No privacy formula is written here: Google's ``dp-accounting`` (the accountant behind TF
Privacy and TFF) composes the rounds, and this class only says which mechanism a round is.

**The event.** Each round the server samples exactly m of the N clients, uniformly and
without replacement, and releases the sum of their clipped deltas plus N(0, (z C)^2),
scaled by 1/m. With a fixed sample size N is public, so the natural neighbouring relation
is *replace one client* (REPLACE_ONE), the only one dp-accounting's RDP accountant
supports for ``SampledWithoutReplacementDpEvent`` (Wang, Balle, Kasiviswanathan 2019,
"Subsampled Renyi DP and analytical moments accountant", Thm. 27). Replacing a client can
move the sum by 2C (from one clipped delta to its opposite), so the Gaussian's multiplier
relative to that sensitivity is z / 2. That is ``sampling="fixed"``, the default, and the
event that matches what the server does.

``sampling="poisson"`` is ``PoissonSampledDpEvent(m / N, Gaussian(z))`` under add/remove
one client: exact for a server that includes each client independently with probability
q (McMahan et al. 2018 analyse DP-FedAvg that way), an *approximation* for fixed-size
sampling. Its epsilon is much smaller (e.g. N=100, m=10, z=1, 100 rounds, delta=1/N^1.1:
4.6 against 77 for the fixed-size bound), partly because add/remove is a weaker relation
than replace-one and partly because the without-replacement bound is looser. Report the
relation with the number.

Both analyses assume the m clients are drawn uniformly at random by a source the clients
cannot predict; a server that takes the first m to connect gets no amplification, and
must then be accounted with m = N (q = 1).

Adaptive clipping (``privacy.adaptive_clipping``) releases two Gaussians per round whose
composition is exactly one Gaussian of multiplier z, so it is accounted with z too.
"""
from __future__ import annotations

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


class PrivacyAccountant:
    """Epsilon spent after ``rounds`` DP rounds of noise multiplier z, sampling m of N clients.

    The server calls :meth:`step` once per released noised aggregate (not for a round that
    was abandoned before release), :meth:`epsilon` for the log, and :meth:`rounds_within`
    once at start to stop before the round that would pass ``--target-epsilon``.
    The library recomputes the rounds' RDP per query (slow for fixed-size sampling with
    its default orders); answers are memoised per round count.
    """

    def __init__(self, noise_multiplier: float, num_clients: int, clients_per_round: int,
                 delta: float | None = None, sampling: str = "fixed") -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"number of clients must be a positive int, got {num_clients!r}")
        if not isinstance(clients_per_round, int) or not 1 <= clients_per_round <= num_clients:
            raise ValueError(f"clients per round must be in 1..{num_clients}, got {clients_per_round!r}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.delta = default_delta(num_clients) if delta is None else float(delta)
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        self.sampling = sampling
        self.rounds = 0
        self._memo: dict[int, float] = {0: 0.0}

    @property
    def sample_rate(self) -> float:
        """q = m / N, the chance that a given client takes part in a round."""
        return self.clients_per_round / self.num_clients

    @property
    def neighboring_relation(self) -> NeighboringRelation:
        return NeighboringRelation.REPLACE_ONE if self.sampling == "fixed" else NeighboringRelation.ADD_OR_REMOVE_ONE

    def round_event(self) -> dp_accounting.DpEvent:
        """One round as a DpEvent (see the module docstring for the choice)."""
        z = self.noise_multiplier
        if self.sampling == "fixed":
            # REPLACE_ONE: one client swapped for another moves the sum by up to 2C.
            return dp_accounting.SampledWithoutReplacementDpEvent(
                self.num_clients, self.clients_per_round, dp_accounting.GaussianDpEvent(z / 2))
        return dp_accounting.PoissonSampledDpEvent(self.sample_rate, dp_accounting.GaussianDpEvent(z))

    def step(self, rounds: int = 1) -> None:
        """Record ``rounds`` more released rounds."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self.rounds += rounds

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` spent by the rounds recorded so far (inf without noise)."""
        return self.epsilon_after(self.rounds)

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon at :attr:`delta` after ``rounds`` rounds in all."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        if rounds not in self._memo:
            if self.noise_multiplier == 0:
                self._memo[rounds] = math.inf
            else:
                accountant = rdp.RdpAccountant(neighboring_relation=self.neighboring_relation)
                accountant.compose(self.round_event(), rounds)
                self._memo[rounds] = float(accountant.get_epsilon(self.delta))
        return self._memo[rounds]

    def rounds_within(self, target_epsilon: float, max_rounds: int) -> int:
        """The most rounds in all (0..``max_rounds``) whose epsilon stays <= ``target_epsilon``.

        The server calls it once at start with its ``--rounds`` and runs
        ``min(--rounds, answer)`` rounds: one library call when the whole run fits the
        budget, else a binary search (epsilon grows with the rounds) of about
        log2(max_rounds) calls.
        """
        if not target_epsilon > 0:
            raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
        if max_rounds < 0:
            raise ValueError(f"max rounds must be >= 0, got {max_rounds}")
        if self.epsilon_after(max_rounds) <= target_epsilon:
            return max_rounds
        good, bad = 0, max_rounds  # epsilon_after(good) <= target < epsilon_after(bad)
        while bad - good > 1:
            mid = (good + bad) // 2
            if self.epsilon_after(mid) <= target_epsilon:
                good = mid
            else:
                bad = mid
        return good

    def describe(self) -> str:
        """One line for the log: what is being accounted, and how."""
        relation = "replace-one" if self.sampling == "fixed" else "add/remove-one"
        how = ("exactly m of N without replacement" if self.sampling == "fixed"
               else "Poisson sampling at q = m/N")
        return (f"privacy: epsilon at delta={self.delta:.3g} for {relation} client, RDP accountant "
                f"(dp-accounting), z={self.noise_multiplier:g}, {how} "
                f"(m={self.clients_per_round}, N={self.num_clients}, q={self.sample_rate:.4g})")

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "noise_multiplier": self.noise_multiplier,
                "num_clients": self.num_clients, "clients_per_round": self.clients_per_round,
                "delta": self.delta, "sampling": self.sampling}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rounds spent. A checkpoint from another setting keeps its rounds but
        is refused if it was accounted differently (a silent mix would misstate epsilon)."""
        for key in ("noise_multiplier", "num_clients", "clients_per_round", "delta", "sampling"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"checkpoint was accounted with {key}={state.get(key)!r}, "
                                 f"this run has {getattr(self, key)!r}")
        rounds = state.get("rounds")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"checkpoint holds no valid DP round count: {rounds!r}")
        self.rounds = rounds
