"""Tests for privacy/: clipping, noise, the DP wrappers and the accountant."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from dp_accounting.privacy_accountant import NeighboringRelation

import server
from fl.common.layout import Layout
from fl.common.vectors import InvalidUpdate, l2_norm
from fl.common.vectors import clip_by_norm as clip_update
from fl.privacy import (
    WEIGHTING_MESSAGE,
    DPAdaptiveClipping,
    DPFixedClipping,
    PrivacyAccountant,
    adaptive_delta_noise_multiplier,
    check_weighting,
    default_delta,
    global_counters,
    make_generator,
)
from fl.server import app
from fl.server.federation import Federation, Session
from fl.strategies.base import Strategy, StrategyError
from fl.wire.handshake import Peer


def gen(seed: int = 0) -> torch.Generator:
    return make_generator(seed)[0]


def vector(norm: float, numel: int = 1000, seed: int = 0) -> torch.Tensor:
    v = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    return (v * (norm / v.double().norm().item())).float()


# --- clipping ----------------------------------------------------------------------------

def test_l2_norm_matches_float64_reference():
    v = torch.randn(300_001, generator=gen())  # spans several slices
    assert l2_norm(v) == pytest.approx(v.double().norm().item(), rel=1e-12)


@pytest.mark.parametrize("norm", [1.5, 10.0, 1e4])
def test_clip_update_bounds_the_norm_and_keeps_the_direction(norm):
    v = vector(norm)
    clipped, original = clip_update(v, 1.0)
    assert original == pytest.approx(norm, rel=1e-6)
    assert l2_norm(clipped) <= 1.0 * (1 + 1e-6)
    assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(clipped * (original / 1.0), v, rtol=1e-5, atol=1e-6)


def test_clip_update_leaves_a_short_delta_untouched():
    v = vector(0.5)
    clipped, original = clip_update(v, 1.0)
    assert clipped is v and original == pytest.approx(0.5, rel=1e-6)
    zero = torch.zeros(10)
    assert clip_update(zero, 1.0)[0] is zero


def test_clip_update_refuses_bad_input():
    with pytest.raises(ValueError):
        clip_update(torch.tensor([float("nan"), 1.0]), 1.0)
    with pytest.raises(ValueError):
        clip_update(torch.ones(3), 0.0)


# --- the fixed-clipping wrapper ----------------------------------------------------------

def dp(inner: Strategy | None = None, z: float = 0.0, clip: float = 1.0, **kw: Any) -> DPFixedClipping:
    return DPFixedClipping(inner or Strategy(), noise_multiplier=z, clip_norm=clip, generator=gen(), **kw)


def test_check_weighting():
    check_weighting("uniform")
    with pytest.raises(StrategyError) as e:
        check_weighting("samples")
    assert str(e.value) == WEIGHTING_MESSAGE and "\n" not in WEIGHTING_MESSAGE


def test_weights_are_ignored_and_the_mean_divides_by_m():
    s = dp(clip=10.0)
    s.begin_round(3)
    agg = s.aggregator(4)
    agg.add(torch.tensor([1.0, 0, 0, 0]), 1.0)
    agg.add(torch.tensor([0, 2.0, 0, 0]), 1000.0)  # a sample-count weight: ignored
    agg.add(torch.tensor([0, 0, 3.0, 0]), 7.0)
    assert torch.allclose(agg.result(), torch.tensor([1.0, 2.0, 3.0, 0], dtype=torch.float64) / 3)
    assert agg.result().dtype == torch.float64


def test_a_dropped_client_does_not_shrink_the_divisor():
    s = dp(clip=10.0)
    s.begin_round(4)
    agg = s.aggregator(2)
    agg.add(torch.tensor([4.0, 0]), 1.0)
    agg.add(torch.tensor([0, 4.0]), 1.0)
    assert torch.equal(agg.result(), torch.tensor([1.0, 1.0], dtype=torch.float64))  # / 4, not / 2


def test_more_updates_than_sampled_are_refused():
    s = dp()
    s.begin_round(1)
    agg = s.aggregator(3)
    agg.add(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="more updates"):
        agg.add(torch.zeros(3), 1.0)


def test_server_side_clipping_bounds_each_contribution():
    s = dp(clip=1.0)
    s.begin_round(2)
    agg = s.aggregator(1000)
    agg.add(vector(50.0, seed=1), 1.0)
    agg.add(vector(0.25, seed=2), 1.0)
    assert agg.unclipped == 1
    expected = (vector(50.0, seed=1).double() / 50.0 + vector(0.25, seed=2).double()) / 2
    assert torch.allclose(agg.result(), expected, rtol=1e-5, atol=1e-7)


def test_aggregation_needs_begin_round():
    with pytest.raises(RuntimeError, match="begin_round"):
        dp().aggregator(3)


@pytest.mark.parametrize("z,clip,m", [(1.0, 1.0, 1), (1.3, 0.7, 4), (0.5, 2.0, 10)])
def test_noise_std_is_z_c_over_m(z, clip, m):
    s = dp(z=z, clip=clip)
    s.begin_round(m)
    agg = s.aggregator(200_000)
    agg.add(torch.zeros(200_000), 1.0)  # the average is pure noise
    noise = agg.result()
    expected = z * clip / m
    assert s.noise_std() == pytest.approx(expected)
    assert noise.std().item() == pytest.approx(expected, rel=0.02)  # 200k draws: ~0.2% spread
    assert abs(noise.mean().item()) < 0.01 * expected


def test_noise_is_drawn_once_per_round():
    s = dp(z=1.0)
    s.begin_round(2)
    agg = s.aggregator(100)
    agg.add(torch.zeros(100), 1.0)
    first = agg.result().clone()
    assert torch.equal(agg.result(), first)
    with pytest.raises(RuntimeError, match="released"):
        agg.add(torch.zeros(100), 1.0)


def test_client_side_mode_checks_norms_and_sends_c():
    s = dp(z=1.0, clip=1.0, clipping="client", norm_tolerance=1e-3)
    assert s.fit_config(1) == {"dp_clip_norm": 1.0}
    assert dp().fit_config(1) == {}
    assert s.accounting_noise_multiplier == pytest.approx(1.0 / 1.001)
    assert dp(z=1.0).accounting_noise_multiplier == 1.0
    s.begin_round(2)
    agg = s.aggregator(1000)
    inside, _ = clip_update(vector(7.0), 1.0)  # what an honest client sends
    agg.add(inside, 1.0)  # accepted as is, not rescaled
    assert torch.equal(agg.sum, inside.double())
    with pytest.raises(InvalidUpdate, match="exceeds the DP clip norm"):
        agg.add(vector(1.01), 1.0)


@pytest.mark.parametrize("kw,message", [
    ({"z": -1.0}, "noise-multiplier"),
    ({"clip": 0.0}, "clip-norm"),
    ({"clipping": "both"}, "clipping"),
])
def test_bad_parameters_are_refused(kw, message):
    with pytest.raises(StrategyError, match=message):
        dp(**kw)


@dataclasses.dataclass
class ServerMomentum(Strategy):
    """A stand-in for a server-optimiser strategy (FedAvgM): state, a config key, its own update."""

    server_lr: float = 1.0
    momentum: float = 0.9
    name = "fedavgm-test"

    def __post_init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        super().__post_init__()

    def fit_config(self, round_num: int) -> dict[str, float]:
        return {"mu": 0.01}

    def server_update(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        self.buffer = delta.clone() if self.buffer is None else self.momentum * self.buffer + delta
        return (weights.double() + self.server_lr * self.buffer).float()

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer}

    def load_state_dict(self, state: dict[str, Any], numel: int | None = None) -> None:
        self.buffer = state["buffer"]


def test_wrapper_composes_with_a_server_optimiser():
    inner, twin = ServerMomentum(), ServerMomentum()
    s = dp(inner, z=0.5, clip=1.0, clipping="client")
    assert s.fit_config(3) == {"mu": 0.01, "dp_clip_norm": 1.0}
    weights = torch.zeros(5)
    for round_num in range(3):
        s.begin_round(2)
        agg = s.aggregator(5)
        agg.add(torch.full((5,), 0.1), 1.0)
        agg.add(torch.full((5,), -0.2), 1.0)
        delta = agg.result()
        new = s.server_update(weights, delta)
        assert torch.equal(new, twin.server_update(weights, delta))  # the inner rule, unchanged
        weights = new
    restored = ServerMomentum()
    dp(restored).load_state_dict(s.state_dict())
    assert torch.equal(restored.buffer, inner.buffer)


def test_wrapper_refuses_a_strategy_that_does_not_average():
    class Median(Strategy):
        name = "median-test"

        def aggregator(self, numel):  # a robust rule: not a mean, other sensitivity
            raise NotImplementedError

    with pytest.raises(StrategyError, match="averages"):
        dp(Median())
    with pytest.raises(StrategyError, match="already"):
        dp(dp())


# --- adaptive clipping -------------------------------------------------------------------

def adaptive(z: float = 0.0, clip: float = 1.0, **kw: Any) -> DPAdaptiveClipping:
    return DPAdaptiveClipping(Strategy(), noise_multiplier=z, clip_norm=clip, generator=gen(), **kw)


def test_delta_noise_multiplier_spends_exactly_z():
    """The paper's z_delta, checked by dp-accounting: the round's two Gaussians (deltas,
    sensitivity C; centred count, sensitivity 1/2) compose to one Gaussian of multiplier z."""
    z, sigma_b = 1.0, 2.0
    z_delta = adaptive_delta_noise_multiplier(z, sigma_b)
    assert z_delta > z

    def eps(event: dp_accounting.DpEvent, relation=NeighboringRelation.ADD_OR_REMOVE_ONE) -> float:
        acc = rdp.RdpAccountant(neighboring_relation=relation)
        acc.compose(event, 50)
        return acc.get_epsilon(1e-5)

    both = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_delta),
                                          dp_accounting.GaussianDpEvent(2 * sigma_b)])
    assert eps(both) == pytest.approx(eps(dp_accounting.GaussianDpEvent(z)), rel=1e-9)
    # Fixed-size sampling (replace-one: sensitivities 2C and 1) is what the accountant charges.
    fixed = dp_accounting.SampledWithoutReplacementDpEvent(20, 5, dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_delta / 2), dp_accounting.GaussianDpEvent(sigma_b)]))
    assert eps(fixed, NeighboringRelation.REPLACE_ONE) == pytest.approx(
        PrivacyAccountant(z, 20, 5, delta=1e-5).epsilon_after(50), rel=1e-9)


def test_adaptive_refuses_a_count_noise_too_small_for_z():
    s = adaptive(z=1.0)  # sigma_b defaults to m / 20
    with pytest.raises(StrategyError, match="clipped-count"):
        s.begin_round(3)  # 2 * 0.15 < 1
    s.begin_round(100)  # 2 * 5 > 1
    assert s.delta_noise_multiplier == pytest.approx(adaptive_delta_noise_multiplier(1.0, 5.0))
    with pytest.raises(StrategyError, match="clipped-count"):
        adaptive(z=1.0, clipped_count_stddev=0.4)
    with pytest.raises(StrategyError, match="server"):
        adaptive(clipping="client")


@pytest.mark.parametrize("norms,sampled,expected_fraction", [
    ([5.0, 5.0, 5.0, 5.0], 4, 0.0),   # all clipped: C grows
    ([0.5, 0.5, 5.0, 5.0], 4, 0.5),   # at the target: C stays
    ([0.5, 0.5], 4, 0.75),            # two of four dropped: centred count / m + 1/2
])
def test_adaptive_clip_norm_update(norms, sampled, expected_fraction):
    s = adaptive(clip=1.0, clipped_count_stddev=1e-12, target_quantile=0.5, clip_lr=0.2)
    s.begin_round(sampled)
    agg = s.aggregator(1000)
    for i, n in enumerate(norms):
        agg.add(vector(n, seed=i), 1.0)
    agg.result()
    assert s.last_unclipped_fraction == pytest.approx(expected_fraction, abs=1e-9)
    assert s.clip_norm == pytest.approx(math.exp(-0.2 * (expected_fraction - 0.5)))
    restored = adaptive(clip=1.0, clipped_count_stddev=1e-12)
    restored.load_state_dict(s.state_dict())
    assert restored.clip_norm == s.clip_norm


def test_adaptive_clip_norm_converges_to_the_target_quantile():
    """Norms uniform on [0, 2]: the median is 1; start at the paper's C0 = 0.1."""
    s = adaptive(z=0.5, clip=0.1)  # sigma_b = m / 20 = 2.5
    norms = torch.Generator().manual_seed(1)
    for _ in range(150):
        s.begin_round(50)
        agg = s.aggregator(2)
        for n in (2 * torch.rand(50, generator=norms)).tolist():
            agg.add(torch.tensor([n, 0.0]), 1.0)
        agg.result()
    assert 0.8 < s.clip_norm < 1.25


# --- the generator -----------------------------------------------------------------------

def test_generator_seeding():
    a, how_a = make_generator(None)
    b, _ = make_generator(None)
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
    assert "CSPRNG" in how_a
    c, how_c = make_generator(1234)
    d, _ = make_generator(1234)
    assert torch.equal(torch.randn(8, generator=c), torch.randn(8, generator=d))
    assert "1234" in how_c


def test_seeded_runs_reproduce_the_noise():
    def noised() -> torch.Tensor:
        s = DPFixedClipping(Strategy(), 1.0, 1.0, make_generator(7)[0])
        s.begin_round(2)
        agg = s.aggregator(50)
        agg.add(torch.ones(50), 1.0)
        return agg.result()
    assert torch.equal(noised(), noised())


# --- the accountant ----------------------------------------------------------------------

def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/std = mu (Balle & Wang 2018,
    "Improving the Gaussian mechanism", Thm. 8), by bisection: an oracle independent of
    dp-accounting. T rounds of the same Gaussian compose to mu * sqrt(T) (Dong, Roth, Su 2019)."""
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        eps = (lo + hi) / 2
        d = _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)
        lo, hi = (eps, hi) if d > delta else (lo, eps)
    return hi


@pytest.mark.parametrize("clients,z,rounds", [(5, 2.0, 10), (10, 1.0, 1), (3, 8.0, 100)])
def test_fixed_sampling_of_everyone_is_the_gaussian_with_sensitivity_2c(clients, z, rounds):
    """m = N: no amplification, each round is a Gaussian of std zC on a sum that one
    replaced client moves by 2C. RDP is an upper bound on the exact epsilon, and close to it."""
    epsilon = PrivacyAccountant(z, clients, clients, delta=1e-5).epsilon_after(rounds)
    exact = exact_gaussian_epsilon(2 / z * math.sqrt(rounds), 1e-5)
    assert exact <= epsilon <= 1.1 * exact


@pytest.mark.parametrize("z,epochs,published", [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)])
def test_poisson_accounting_against_the_tf_privacy_table(z, epochs, published):
    """TF Privacy's tutorials/README.md table (MNIST DP-SGD: 60,000 examples, batch 256,
    delta 1e-5) was computed with its earlier RDP accountant; dp-accounting converts RDP to
    (epsilon, delta) with the tighter bound of Canonne, Kamath, Steinke 2020, so the same
    mechanism must come out somewhat below the published figure, never above it."""
    acc = PrivacyAccountant(z, 60000, 256, delta=1e-5, sampling="poisson")
    epsilon = acc.epsilon_after(int(epochs * 60000 / 256))
    assert 0.75 * published <= epsilon <= published


def library_epsilon(events: list[tuple[dp_accounting.DpEvent, int]], delta: float,
                    relation: NeighboringRelation = NeighboringRelation.REPLACE_ONE) -> float:
    """dp-accounting's own figure for these (event, count) pairs, composed by its RDP accountant."""
    acc = rdp.RdpAccountant(neighboring_relation=relation)
    for event, count in events:
        acc.compose(event, count)
    return acc.get_epsilon(delta)


def wor(n: int, m: int, z: float) -> dp_accounting.DpEvent:
    """m of n without replacement, Gaussian of multiplier z on a sensitivity of 2C."""
    return dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2))


def test_step_epsilon_and_state():
    acc = PrivacyAccountant(2.0, 5, 5)
    assert acc.epsilon() == 0.0 and acc.rounds == 0 and acc.delta == default_delta(5) == 5 ** -1.1
    acc.step(5, 5)
    acc.step(5, 5)
    assert acc.rounds == 2 and acc.epsilon() == acc.epsilon_after(2) > PrivacyAccountant(2.0, 5, 5).epsilon_after(1) > 0
    assert acc.epsilon_after(3) == acc.epsilon_if(5, 5) > acc.epsilon()
    with pytest.raises(ValueError, match="already recorded"):
        acc.epsilon_after(1)
    other = PrivacyAccountant(2.0, 5, 5)
    other.load_state_dict(acc.state_dict())
    assert other.rounds == 2 and other.epsilon() == acc.epsilon()
    assert PrivacyAccountant(0.0, 5, 5).epsilon_after(1) == math.inf
    with pytest.raises(ValueError, match="clients per round"):
        acc.step(5, 6)


def test_the_issue_example_three_of_ten_is_charged_at_the_realised_rate():
    """Issue 21, item 5: N = 10 declared, m = 3 planned, z = 1, but only 3 clients connected
    (a run that went on after a round timeout), so every round sampled 3 of 3. Charged at
    the declared q = 3/10 it reported 48.8; at the realised q = 1 it is dp-accounting's 58.0,
    the plain Gaussian of multiplier z/2 twenty times."""
    acc = PrivacyAccountant(1.0, 10, 3)
    for _ in range(20):
        acc.step(3, 3)
    expected = library_epsilon([(wor(3, 3, 1.0), 20)], 10 ** -1.1)
    assert acc.epsilon() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(library_epsilon([(dp_accounting.GaussianDpEvent(0.5), 20)], 10 ** -1.1), rel=1e-9)
    assert round(acc.epsilon(), 1) == 58.0
    assert round(PrivacyAccountant(1.0, 10, 3).epsilon_after(20), 1) == 48.8  # the declared rate: the old report


def test_rounds_of_different_rates_compose_as_the_library_composes_them():
    acc = PrivacyAccountant(1.5, 100, 10, delta=1e-5)
    for n, m in [(100, 10)] * 5 + [(40, 10)] * 3 + [(100, 10)] * 2 + [(10, 10)]:
        acc.step(n, m)
    assert acc.released == {(1.5, 100, 10): 7, (1.5, 40, 10): 3, (1.5, 10, 10): 1}
    expected = library_epsilon([(wor(100, 10, 1.5), 7), (wor(40, 10, 1.5), 3), (wor(10, 10, 1.5), 1)], 1e-5)
    assert acc.epsilon() == pytest.approx(expected, rel=1e-12)
    assert acc.epsilon_if(20, 10) == pytest.approx(
        library_epsilon([(wor(100, 10, 1.5), 7), (wor(40, 10, 1.5), 3), (wor(10, 10, 1.5), 1), (wor(20, 10, 1.5), 1)],
                        1e-5), rel=1e-12)
    poisson = PrivacyAccountant(1.5, 100, 10, delta=1e-5, sampling="poisson")
    poisson.step(40, 10)
    assert poisson.epsilon() == pytest.approx(library_epsilon(
        [(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.5)), 1)], 1e-5,
        NeighboringRelation.ADD_OR_REMOVE_ONE), rel=1e-12)


def test_a_resumed_accountant_charges_the_old_rounds_at_their_own_noise():
    """A changed --dp-noise-multiplier is accounted, not re-accounted with the new z."""
    first = PrivacyAccountant(1.0, 20, 5, delta=1e-5)
    for _ in range(10):
        first.step(20, 5)
    resumed = PrivacyAccountant(2.0, 20, 5, delta=1e-5)
    resumed.load_state_dict(first.state_dict())
    assert resumed.rounds == 10 and resumed.epsilon() == pytest.approx(first.epsilon(), rel=1e-12)
    for _ in range(4):
        resumed.step(20, 5)
    expected = library_epsilon([(wor(20, 5, 1.0), 10), (wor(20, 5, 2.0), 4)], 1e-5)
    assert resumed.epsilon() == pytest.approx(expected, rel=1e-12)
    assert resumed.epsilon() > PrivacyAccountant(2.0, 20, 5, delta=1e-5).epsilon_after(14)  # what today's z alone says
    noiseless = PrivacyAccountant(0.0, 100, 10)  # clipping only: nothing a later z can make finite
    noiseless.step(100, 10)
    later = PrivacyAccountant(5.0, 100, 10)
    later.load_state_dict(noiseless.state_dict())
    later.step(100, 10)
    assert later.epsilon() == math.inf


@pytest.mark.parametrize("state, message", [
    ({"sampling": "poisson", "delta": 1e-5, "released": []}, "sampling='poisson'"),
    ({"sampling": "fixed", "released": "3"}, "malformed"),
    ({"sampling": "fixed", "released": [[1.0, 10, 11, 1]]}, "clients per round"),
    ({"sampling": "fixed", "released": [[1.0, 10, 2, 0]]}, "round count"),
    ({"sampling": "fixed", "released": [[-1.0, 10, 2, 1]]}, "noise multiplier"),
    ({"sampling": "fixed", "released": [[1.0, 10, 2]]}, "malformed"),
    ([], "malformed"),
])
def test_accountant_state_from_a_checkpoint_is_checked(state, message):
    acc = PrivacyAccountant(1.0, 10, 2)
    with pytest.raises(ValueError, match=message):
        acc.load_state_dict(state)
    assert acc.rounds == 0


def test_fixed_sampling_charges_more_than_the_poisson_approximation():
    fixed = PrivacyAccountant(1.0, 100, 10).epsilon_after(20)
    poisson = PrivacyAccountant(1.0, 100, 10, sampling="poisson").epsilon_after(20)
    assert fixed > poisson > 0


@pytest.mark.parametrize("args", [(-1.0, 10, 2), (1.0, 10, 11), (1.0, 10, 0), (1.0, 0, 1)])
def test_accountant_refuses_bad_parameters(args):
    with pytest.raises(ValueError):
        PrivacyAccountant(*args)
    with pytest.raises(ValueError):
        default_delta(1)


def test_a_refused_update_reason_carries_no_norm():
    """The reason is logged and counted: under DP it must not carry the update's norm."""
    s = dp(z=1.0, clip=0.1, clipping="client")
    s.begin_round(1)
    with pytest.raises(InvalidUpdate) as refused:
        s.aggregator(1000).add(vector(63.4), 1.0)
    assert "exceeds the DP clip norm 0.1 " in str(refused.value) and "63" not in str(refused.value)


# --- the server under DP: integer buffers ---------------------------------------------------

def test_global_counters_advance_num_batches_tracked_by_one_and_keep_other_ints():
    state = {"bn.num_batches_tracked": torch.tensor(7), "w": torch.ones(3), "steps": torch.tensor([4, 5])}
    layout = Layout.of(state)
    out = layout.unflatten(layout.flatten(state)[0], global_counters(layout, state))
    assert out["bn.num_batches_tracked"].item() == 8 and out["steps"].tolist() == [4, 5]


def submit_round(fed: Federation, counters: dict[int, int]) -> dict[str, torch.Tensor]:
    """One round where client i reports BatchNorm counters ``counters[i]``; the new global state."""
    sessions = {cid: Session(Peer(cid, 100, {}), f"t:{cid}") for cid in counters}
    fed.sessions.update(sessions)
    rnd, task = fed.open_round(1, 0, dict(fed.sessions))
    for cid, s in sessions.items():
        local = {k: v + 0.01 if v.is_floating_point() else torch.full_like(v, counters[cid])
                 for k, v in task.base.items()}
        fed.submit(s, task, {"round": 1, "num_samples": 100, "metrics": {}, "quantized": False,
                             "flat": Layout.of(local).pack(local)}, 1, 1)
    fed.close_round(rnd)
    state = fed.finish_round(rnd)
    assert state is not None
    return state


@pytest.mark.parametrize("dp_on", [True, False])
def test_under_dp_the_batchnorm_counters_are_not_taken_from_clients(dp_on):
    """Clients report num_batches_tracked 1000 and 3000 (their batch counts: a function of
    their sample counts). Without DP the server averages them (2000); under DP it advances
    its own counter by one and never reads theirs."""
    argv = ["--min-clients", "2", "--clip-norm", "1"] + (["--dp-noise-multiplier", "0.5", "--dp-seed", "0"] if dp_on else [])
    config, _ = server.parse_args(argv)
    fed = Federation(config, app.build_strategy(config))
    names = [k for k in fed.global_state if k.endswith("num_batches_tracked")]
    before = {k: int(fed.global_state[k]) for k in names}
    state = submit_round(fed, {0: 1000, 1: 3000})
    assert names and all(int(state[k]) == (before[k] + 1 if dp_on else 2000) for k in names)


def test_target_epsilon_is_checked_again_at_the_realised_rate_before_release(caplog):
    """Planned: 3 of 10 (epsilon 3.53 for one round at z = 1). If only 3 clients are connected
    the round is 3 of 3 (5.15): a target between the two lets the round start, not be released."""
    config, _ = server.parse_args(["--min-clients", "10", "--min-fit", "3", "--fraction", "0.3", "--clip-norm", "1",
                                   "--dp-noise-multiplier", "1", "--target-epsilon", "4"])
    accountant = app.build_accountant(config, app.build_strategy(config))
    assert (accountant.num_clients, accountant.clients_per_round) == (10, 3)
    planned, realised = accountant.epsilon_if(10, 3), accountant.epsilon_if(3, 3)
    assert planned < 4 < realised
    assert not app.passes_target(accountant, config, 1)
    assert not app.passes_target(accountant, config, 1, SimpleNamespace(connected=10, participants=[0, 1, 2]))
    assert app.passes_target(accountant, config, 1, SimpleNamespace(connected=3, participants=[0, 1, 2]))
    assert f"stopping without releasing round 1: 3 sampled of 3 connected would spend epsilon {realised:.3f}" in caplog.text
    assert accountant.rounds == 0
