"""Strategies against hand-computed examples of their published rules, and the registry.

Every expected number below was worked out by hand from the paper's update rule (the
arithmetic is in the comments), not by running the code under test.
"""
from __future__ import annotations

import dataclasses
import io
import sys
import textwrap

import pytest
import torch

from fl import strategies
from fl.strategies import MeanAggregator, Strategy, StrategyError, available, cli_parameters, make, robust
from fl.strategies.base import param


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def run_round(strategy: Strategy, weights: torch.Tensor, updates: list[tuple[list[float], float]]) -> torch.Tensor:
    """One round as the server runs it: fold (delta, weight) pairs, then the server step."""
    agg = strategy.aggregator(weights.numel())
    for delta, weight in updates:
        agg.add(vec(*delta), weight)
    assert agg.count == len(updates)
    return strategy.server_update(weights, agg.result())


def run_rounds(strategy: Strategy, x0: list[float], rounds: list[list[float]]) -> list[torch.Tensor]:
    """One client per round (weight 1): the aggregate is that delta."""
    xs, x = [], vec(*x0)
    for delta in rounds:
        x = run_round(strategy, x, [(delta, 1.0)])
        assert x.dtype == torch.float32
        xs.append(x)
    return xs


def close(t: torch.Tensor, *expected: float, tol: float = 1e-6) -> bool:
    return torch.allclose(t.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=tol)


def roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint is."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------- registry

class TestRegistry:
    def test_every_strategy_is_found_sorted_by_name(self):
        assert list(available()) == ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedprox", "fedyogi",
                                     "median", "trimmed-mean"]
        for name, cls in available().items():
            assert cls.name == name and issubclass(cls, Strategy)
            assert cls.__doc__ or sys.modules[cls.__module__].__doc__

    def test_make_with_defaults_and_with_parameters(self):
        s = make("fedadam")
        assert (s.server_lr, s.beta1, s.beta2, s.tau) == (0.1, 0.9, 0.99, 1e-9)
        s = make("fedadam", server_lr=1, beta1=0.5)
        assert s.server_lr == 1.0 and isinstance(s.server_lr, float) and s.beta1 == 0.5

    def test_unknown_name_lists_the_known_ones(self):
        with pytest.raises(StrategyError) as e:
            make("fedsgd")
        assert str(e.value) == ("unknown strategy 'fedsgd' (known: fedadagrad, fedadam, fedavg, fedavgm, "
                                "fedprox, fedyogi, median, trimmed-mean)")

    def test_unknown_parameter(self):
        with pytest.raises(StrategyError, match=r"^--mu is not a parameter of fedavg \(its parameters: none\)$"):
            make("fedavg", mu=0.1)
        with pytest.raises(StrategyError, match=r"^--beta2 is not a parameter of fedadagrad \(its parameters: "
                                                r"--server-lr, --beta1, --tau\)$"):
            make("fedadagrad", beta2=0.9)

    @pytest.mark.parametrize("name, params, message", [
        ("fedprox", {"mu": -1}, "--mu must be >= 0, got -1"),
        ("trimmed-mean", {"trim_fraction": 0.5}, "--trim-fraction must be in [0, 0.5), got 0.5"),
        ("trimmed-mean", {"trim_fraction": -0.1}, "--trim-fraction must be in [0, 0.5), got -0.1"),
        ("fedavgm", {"server_momentum": 1.0}, "--server-momentum must be in [0, 1), got 1"),
        ("fedavgm", {"server_lr": 0}, "--server-lr must be > 0, got 0"),
        ("fedadam", {"beta1": 1}, "--beta1 must be in [0, 1), got 1"),
        ("fedyogi", {"beta2": -0.5}, "--beta2 must be in [0, 1), got -0.5"),
        ("fedadagrad", {"beta1": 1.5}, "--beta1 must be in [0, 1), got 1.5"),
        ("fedadam", {"tau": 0}, "--tau must be > 0, got 0"),
        ("fedyogi", {"tau": -1e-3}, "--tau must be > 0, got -0.001"),
        ("fedadam", {"server_lr": -0.1}, "--server-lr must be > 0, got -0.1"),
        ("fedprox", {"mu": float("nan")}, "--mu must be a finite number, got nan"),
        ("fedprox", {"mu": float("inf")}, "--mu must be a finite number, got inf"),
        ("fedprox", {"mu": "0.1"}, "--mu must be a finite number, got '0.1'"),
        ("fedprox", {"mu": True}, "--mu must be a finite number, got True"),
    ])
    def test_bad_values_give_one_line(self, name, params, message):
        with pytest.raises(StrategyError) as e:
            make(name, **params)
        assert str(e.value) == message

    def test_boundary_values_are_accepted(self):
        make("fedprox", mu=0)
        make("trimmed-mean", trim_fraction=0)
        make("trimmed-mean", trim_fraction=0.49)
        make("fedavgm", server_momentum=0)
        make("fedadam", beta1=0, beta2=0)

    def test_cli_parameters_union_types_and_help(self):
        params = cli_parameters()
        assert list(params) == ["beta1", "beta2", "mu", "server_lr", "server_momentum", "tau", "trim_fraction"]
        for name, f in params.items():
            assert f.name == name and f.type is float and f.metadata["help"]
        lr = params["server_lr"]
        assert lr.default is dataclasses.MISSING  # defaults differ per strategy
        assert lr.metadata["defaults"] == {"fedadagrad": 0.1, "fedadam": 0.1, "fedavgm": 1.0, "fedyogi": 0.01}
        assert lr.metadata["help"].endswith("(default: fedadagrad, fedadam 0.1; fedavgm 1; fedyogi 0.01)")
        assert params["mu"].default == 0.01 and params["mu"].metadata["strategies"] == ("fedprox",)
        assert params["beta2"].metadata["strategies"] == ("fedadam", "fedyogi")

    def test_cli_parameters_refuses_one_name_with_two_types(self):
        @dataclasses.dataclass
        class A(Strategy):
            x: float = param(1.0, "x as a float")

        @dataclasses.dataclass
        class B(Strategy):
            x: int = param(1, "x as an int")

        with pytest.raises(TypeError, match="parameter 'x' is <class 'float'> in a but <class 'int'> in b"):
            cli_parameters({"a": A, "b": B})

        @dataclasses.dataclass
        class C(Strategy):
            y: float = 1.0

        with pytest.raises(ValueError, match="no metadata"):
            cli_parameters({"c": C})

    def test_a_new_file_is_a_new_strategy(self, tmp_path, monkeypatch):
        (tmp_path / "extra_strategy.py").write_text(textwrap.dedent('''
            import dataclasses
            from typing import ClassVar
            from fl.strategies.base import param
            from fl.strategies.fedavg import FedAvg  # imported: must not register twice

            @dataclasses.dataclass
            class Extra(FedAvg):
                name: ClassVar[str] = "extra"
                gamma: float = param(0.5, "extra's gamma")

            class Helper(Extra):                   # inherits a name: not registered
                pass
        '''))
        monkeypatch.setattr(strategies, "__path__", [*strategies.__path__, str(tmp_path)])
        strategies._registry.cache_clear()
        try:
            assert "extra" in available() and available()["fedavg"].__name__ == "FedAvg"
            assert make("extra", gamma=2).gamma == 2.0
            assert cli_parameters()["gamma"].metadata["strategies"] == ("extra",)
            (tmp_path / "dup_strategy.py").write_text(
                "import dataclasses\nfrom typing import ClassVar\nfrom fl.strategies.base import Strategy\n"
                "@dataclasses.dataclass\nclass Dup(Strategy):\n    name: ClassVar[str] = 'fedavg'\n")
            strategies._registry.cache_clear()
            with pytest.raises(RuntimeError, match="'fedavg' is defined twice"):
                available()
        finally:
            monkeypatch.undo()
            strategies._registry.cache_clear()
            for mod in ("fl.strategies.extra_strategy", "fl.strategies.dup_strategy"):
                sys.modules.pop(mod, None)
        assert "extra" not in available()

    def test_fit_config_and_holds_updates(self):
        assert make("fedprox", mu=0.3).fit_config(1) == {"mu": 0.3}
        assert make("fedprox").fit_config(7) == {"mu": 0.01}
        for name, cls in available().items():
            if name != "fedprox":
                assert make(name).fit_config(1) == {}
            assert cls.holds_updates == (name in ("median", "trimmed-mean"))


# --------------------------------------------------------------------------- MeanAggregator

class TestMeanAggregator:
    def test_weighted_mean(self):
        agg = MeanAggregator(2)
        agg.add(vec(1, 0), 1)
        agg.add(vec(3, 4), 3)
        assert agg.count == 2 and agg.result().dtype == torch.float64
        assert close(agg.result(), 2.5, 3.0, tol=0)  # (1 + 9) / 4, (0 + 12) / 4

    def test_bad_inputs(self):
        agg = MeanAggregator(3)
        with pytest.raises(ValueError, match="shape"):
            agg.add(vec(1, 2), 1)
        for weight in (0, -1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="weight"):
                agg.add(vec(1, 2, 3), weight)
        with pytest.raises(ValueError, match="no updates"):
            agg.result()


# --------------------------------------------------------------------------- FedAvg / FedProx

class TestFedAvg:
    def test_two_rounds(self):
        s = make("fedavg")
        x = vec(1, 2)
        # round 1: weighted mean of [1,0] (w 1) and [3,4] (w 3) = [2.5, 3] -> x = [3.5, 5]
        x = run_round(s, x, [([1, 0], 1), ([3, 4], 3)])
        assert close(x, 3.5, 5.0, tol=0)
        # round 2: mean of [-1,1] and [1,1] = [0, 1] -> x = [3.5, 6]
        x = run_round(s, x, [([-1, 1], 1), ([1, 1], 1)])
        assert close(x, 3.5, 6.0, tol=0)
        assert s.state_dict() == {}

    def test_fedprox_server_side_is_fedavg(self):
        s = make("fedprox", mu=1.0)
        x = run_round(s, vec(1, 2), [([1, 0], 1), ([3, 4], 3)])
        assert close(x, 3.5, 5.0, tol=0)


# --------------------------------------------------------------------------- FedAvgM

class TestFedAvgM:
    def test_three_rounds(self):
        # eta = 0.5, beta = 0.5; g = -Delta, v = beta v + g, x = x - eta v
        s = make("fedavgm", server_lr=0.5, server_momentum=0.5)
        xs = run_rounds(s, [1, 2], [[2, -4], [2, 2], [0, 0]])
        # r1: g = [-2, 4], v = [-2, 4],                    x = [1, 2] - 0.5 [-2, 4] = [2, 0]
        # r2: g = [-2, -2], v = 0.5 [-2, 4] + g = [-3, 0],  x = [2, 0] + [1.5, 0]   = [3.5, 0]
        # r3: g = [0, 0],  v = [-1.5, 0],                   x = [3.5, 0] + [0.75, 0] = [4.25, 0]
        assert close(xs[0], 2, 0, tol=0) and close(xs[1], 3.5, 0, tol=0) and close(xs[2], 4.25, 0, tol=0)
        assert close(s.velocity, -1.5, 0, tol=0) and s.step == 3

    def test_defaults_amplify_a_steady_drift(self):
        # eta = 1, beta = 0.9, Delta = 1 every round: v = -1, -1.9, -2.71; x = 1, 2.9, 5.61
        xs = run_rounds(make("fedavgm"), [0], [[1], [1], [1]])
        assert [round(x.item(), 5) for x in xs] == [1.0, 2.9, 5.61]

    def test_no_momentum_is_fedavg(self):
        xs = run_rounds(make("fedavgm", server_momentum=0), [1, 2], [[2, -4], [2, 2]])
        assert close(xs[1], 5, 0, tol=0)


# --------------------------------------------------------------------------- FedAdam / FedYogi / FedAdagrad

class TestFedAdam:
    def test_three_rounds(self):
        # eta = 1, beta1 = beta2 = 0.5, tau = 0.5 so v_{-1} = tau^2 = 0.25; denominators sqrt(v) + 0.5
        s = make("fedadam", server_lr=1, beta1=0.5, beta2=0.5, tau=0.5)
        xs = run_rounds(s, [0, 1], [[3.5, 0.5], [-2.5, 0.5], [2.5, 0.5]])
        # coordinate 0:
        # r1: m = 0.5*3.5 = 1.75;            v = 0.5*0.25 + 0.5*12.25 = 6.25; x = 0 + 1.75/3 = 0.583333
        # r2: m = 0.875 - 1.25 = -0.375;     v = 3.125 + 3.125 = 6.25;        x = 0.583333 - 0.125 = 0.458333
        # r3: m = -0.1875 + 1.25 = 1.0625;   v = 6.25;                        x = 0.458333 + 0.354167 = 0.8125
        # coordinate 1: Delta = 0.5 each round, v = 0.125 + 0.125 = 0.25 throughout, denominator 1:
        # m = 0.25, 0.375, 0.4375;  x = 1.25, 1.625, 2.0625
        assert close(xs[0], 0.5833333, 1.25) and close(xs[1], 0.4583333, 1.625) and close(xs[2], 0.8125, 2.0625)
        assert close(s.m, 1.0625, 0.4375, tol=1e-12) and close(s.v, 6.25, 0.25, tol=1e-12) and s.step == 3

    def test_defaults_first_step_is_eta_times_the_sign(self):
        # m = 0.1 Delta, v = 0.99e-18 + 0.01 Delta^2 ~ (0.1 |Delta|)^2: step = 0.1 * sign(Delta), any |Delta|
        xs = run_rounds(make("fedadam"), [0, 0, 0], [[1e-3, -5.0, 0.0]])
        assert close(xs[0], 0.1, -0.1, 0.0)


class TestFedYogi:
    def test_three_rounds(self):
        # eta = 1, beta1 = beta2 = 0.5, tau = 0.5 (v_{-1} = 0.25); v = v - 0.5 Delta^2 sign(v - Delta^2)
        s = make("fedyogi", server_lr=1, beta1=0.5, beta2=0.5, tau=0.5)
        xs = run_rounds(s, [0, 0], [[2, 0], [1.5, -0.5], [1, 0]])
        # coordinate 0:
        # r1: Delta^2 = 4 > v:      v = 0.25 + 2 = 2.25;   m = 1;     x = 1/(1.5+0.5) = 0.5
        # r2: Delta^2 = 2.25 = v:   v = 2.25 (sign 0);    m = 1.25;  x = 0.5 + 1.25/2 = 1.125
        # r3: Delta^2 = 1 < v:      v = 2.25 - 0.5 = 1.75; m = 1.125; x = 1.125 + 1.125/(sqrt(1.75)+0.5)
        #                                                              = 1.125 + 0.6171567 = 1.7421567
        # coordinate 1: v stays 0.25 (Delta^2 = 0, then = v, then 0); m = 0, -0.25, -0.125;
        #                                                   x = 0, -0.25/1 = -0.25, -0.375
        assert close(xs[0], 0.5, 0) and close(xs[1], 1.125, -0.25) and close(xs[2], 1.7421567, -0.375)
        assert close(s.v, 1.75, 0.25, tol=1e-12) and close(s.m, 1.125, -0.125, tol=1e-12)

    def test_defaults(self):
        s = make("fedyogi")
        assert (s.server_lr, s.beta1, s.beta2, s.tau) == (0.01, 0.9, 0.99, 1e-3)


class TestFedAdagrad:
    def test_three_rounds_with_momentum(self):
        # eta = 1, beta1 = 0.5, tau = 0.75 (v_{-1} = 0.5625); v = v + Delta^2
        s = make("fedadagrad", server_lr=1, beta1=0.5, tau=0.75)
        xs = run_rounds(s, [0, -1], [[1, 0], [3, 0], [0, 1]])
        # coordinate 0:
        # r1: v = 0.5625 + 1 = 1.5625 (1.25^2);  m = 0.5;   x = 0.5/(1.25+0.75) = 0.25
        # r2: v = 1.5625 + 9 = 10.5625 (3.25^2); m = 1.75;  x = 0.25 + 1.75/4 = 0.6875
        # r3: v unchanged;                       m = 0.875; x = 0.6875 + 0.875/4 = 0.90625
        # coordinate 1: v = 0.5625, 0.5625, 1.5625; m = 0, 0, 0.5; x = -1, -1, -1 + 0.5/2 = -0.75
        assert close(xs[0], 0.25, -1) and close(xs[1], 0.6875, -1) and close(xs[2], 0.90625, -0.75)
        assert close(s.v, 10.5625, 1.5625, tol=1e-12)

    def test_defaults_have_no_momentum(self):
        # Flower's defaults: eta = 0.1, beta1 = 0, tau = 1e-9. With beta1 = 0 a zero delta moves nothing.
        s = make("fedadagrad")
        assert (s.server_lr, s.beta1, s.tau) == (0.1, 0.0, 1e-9) and not hasattr(s, "beta2")
        # r1: x = 0.1 * 1/1 = 0.1; r2: v = 1 + 9 = 10, x = 0.1 + 0.1*3/sqrt(10) = 0.1948683; r3: x unchanged
        xs = run_rounds(s, [0], [[1], [3], [0]])
        assert close(xs[0], 0.1) and close(xs[1], 0.1948683) and close(xs[2], 0.1948683)


# --------------------------------------------------------------------------- optimizer state

STATEFUL = [("fedavgm", {}), ("fedadam", {}), ("fedyogi", {}), ("fedadagrad", {"beta1": 0.9})]


class TestState:
    @pytest.mark.parametrize("name, params", STATEFUL)
    def test_resumed_run_takes_the_same_next_step(self, name, params):
        g = torch.Generator().manual_seed(0)
        deltas = [torch.randn(50, generator=g) * 0.1 for _ in range(3)]
        x0 = torch.randn(50, generator=g)

        def step(s, x, d):
            agg = s.aggregator(50)
            agg.add(d, 10)
            return s.server_update(x, agg.result())

        uninterrupted = make(name, **params)
        x = x0
        for d in deltas[:2]:
            x = step(uninterrupted, x, d)
        saved = roundtrip(uninterrupted.state_dict())
        expected = step(uninterrupted, x, deltas[2])

        resumed = make(name, **params)
        resumed.load_state_dict(saved)
        assert resumed.step == 2
        assert torch.equal(step(resumed, x, deltas[2]), expected)
        # a fresh strategy's state loads too, and is a fresh start
        fresh = make(name, **params)
        fresh.load_state_dict(roundtrip(make(name, **params).state_dict()))
        assert torch.equal(step(fresh, x0, deltas[0]), step(make(name, **params), x0, deltas[0]))

    def test_state_dict_tensors_never_change_afterwards(self):
        s = make("fedadam")
        x = run_round(s, vec(0, 0), [([1, 2], 1)])
        state = s.state_dict()
        m = state["m"].clone()
        run_round(s, x, [([5, 5], 1)])
        assert torch.equal(state["m"], m)  # a background checkpoint may hold it without a copy

    def test_bad_states_are_refused(self):
        s = make("fedadam")
        run_round(s, vec(0, 0), [([1, 2], 1)])
        good = s.state_dict()
        bad = [
            ([], "not a dict"),
            ({**good, "strategy": "fedyogi"}, "belongs to 'fedyogi', not 'fedadam'"),
            ({}, "belongs to None"),
            ({k: v for k, v in good.items() if k != "v"}, "has keys"),
            ({**good, "step": -1}, "step -1"),
            ({**good, "step": 1.0}, "step 1.0"),
            ({**good, "m": torch.tensor([float("nan"), 0.0], dtype=torch.float64)}, "NaN or Inf"),
            ({**good, "v": torch.tensor([-1.0, 1.0], dtype=torch.float64)}, "negative"),
            ({**good, "v": torch.ones(3, dtype=torch.float64)}, "has 3 values, expected 2"),
            ({**good, "m": torch.ones(2, 1)}, "1-D floating tensor"),
            ({**good, "m": [0.0, 0.0]}, "1-D floating tensor"),
            ({**good, "step": 0}, "step 0 has moments"),
        ]
        for state, message in bad:
            with pytest.raises(StrategyError, match=message):
                make("fedadam").load_state_dict(state)
        with pytest.raises(StrategyError, match="lacks a momentum buffer"):
            make("fedavgm").load_state_dict({"strategy": "fedavgm", "step": 2, "velocity": None})

    def test_state_for_another_model_is_refused_at_the_first_step(self):
        s = make("fedadam")
        run_round(s, vec(0, 0), [([1, 2], 1)])
        other = make("fedadam")
        other.load_state_dict(s.state_dict())
        with pytest.raises(StrategyError, match="state is for 2 values, the update has 3"):
            run_round(other, vec(0, 0, 0), [([1, 2, 3], 1)])
        m = make("fedavgm")
        run_round(m, vec(0, 0), [([1, 2], 1)])
        with pytest.raises(StrategyError, match="state is for 2 values, the update has 3"):
            run_round(m, vec(0, 0, 0), [([1, 2, 3], 1)])


# --------------------------------------------------------------------------- median / trimmed mean

class TestMedian:
    def test_two_rounds_odd_and_even(self):
        s = make("median")
        # r1, 3 clients: per coordinate median of (1, 2, 100), (10, -5, 0), (-3, 0, 1) = (2, 0, 0)
        x = run_round(s, vec(0, 0, 0), [([1, 10, -3], 1), ([2, -5, 0], 1), ([100, 0, 1], 1)])
        assert close(x, 2, 0, 0, tol=0)
        # r2, 4 clients: mean of the two middle values: (1,2,3,4) -> 2.5, (0,0,8,-8) -> 0, (-1,-2,-3,-4) -> -2.5
        x = run_round(s, x, [([1, 0, -1], 1), ([2, 0, -2], 1), ([3, 8, -3], 1), ([4, -8, -4], 1)])
        assert close(x, 4.5, 0, -2.5, tol=0)

    def test_matches_a_reference_across_chunks(self, monkeypatch):
        monkeypatch.setattr(robust, "_CHUNK_BYTES", 4 * 4 * 7)  # 7 coordinates per chunk for 4 clients
        g = torch.Generator().manual_seed(1)
        rows = [torch.randn(100, generator=g) for _ in range(4)]
        agg = make("median").aggregator(100)
        for r in rows:
            agg.add(r, 1)
        reference = torch.quantile(torch.stack(rows).double(), 0.5, dim=0)  # interpolates: mean of middle two
        assert torch.allclose(agg.result(), reference, rtol=0, atol=1e-12)

    def test_the_aggregator_copies_each_delta(self):
        agg = make("median").aggregator(2)
        buf = vec(1, 1)
        agg.add(buf, 1)
        buf.fill_(50)  # the server reuses its receive buffers
        agg.add(vec(3, 3), 1)
        agg.add(buf, 1)
        assert close(agg.result(), 3, 3, tol=0)


class TestTrimmedMean:
    def test_two_rounds(self):
        s = make("trimmed-mean", trim_fraction=0.2)
        # r1, 5 clients, k = floor(0.2*5) = 1 dropped at each end:
        #   (1, 2, 3, 4, 100) -> mean(2, 3, 4) = 3;  (-50, 0, 0, 6, 3) -> mean(0, 0, 3) = 1
        x = run_round(s, vec(0, 0), [([1, -50], 1), ([2, 0], 1), ([3, 0], 1), ([4, 6], 1), ([100, 3], 1)])
        assert close(x, 3, 1)
        # r2, 4 clients, k = floor(0.8) = 0: the plain mean: (1+2+3+10)/4 = 4, (0+0+0+-4)/4 = -1
        x = run_round(s, x, [([1, 0], 1), ([2, 0], 1), ([3, 0], 1), ([10, -4], 1)])
        assert close(x, 7, 0)

    def test_trim_count(self):
        assert [robust.trim_count(n, 0.1) for n in (5, 9, 10, 19, 20)] == [0, 0, 1, 1, 2]
        assert robust.trim_count(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
        assert robust.trim_count(7, 0) == 0

    def test_matches_a_reference_across_chunks(self, monkeypatch):
        monkeypatch.setattr(robust, "_CHUNK_BYTES", 4 * 10 * 3)
        g = torch.Generator().manual_seed(2)
        stack = torch.randn(10, 50, generator=g)
        agg = make("trimmed-mean", trim_fraction=0.25).aggregator(50)  # k = 2
        for r in stack:
            agg.add(r, 1)
        reference = stack.double().sort(dim=0).values[2:8].mean(dim=0)
        assert torch.allclose(agg.result(), reference, rtol=0, atol=1e-12)


class TestRobustness:
    def honest_and_one_outlier(self, weight_of_outlier: float = 1.0) -> list[tuple[torch.Tensor, float]]:
        g = torch.Generator().manual_seed(3)
        honest = [(0.1 + 0.01 * torch.randn(20, generator=g), 1.0) for _ in range(9)]
        return honest + [(torch.full((20,), 1e6), weight_of_outlier)]

    def aggregate(self, name: str, updates, **params) -> torch.Tensor:
        agg = make(name, **params).aggregator(20)
        for delta, weight in updates:
            agg.add(delta, weight)
        return agg.result()

    def test_one_huge_outlier(self):
        updates = self.honest_and_one_outlier()
        assert self.aggregate("fedavg", updates).min() > 1e4  # the mean is dragged along
        for name in ("median", "trimmed-mean"):  # 10 clients: the default trim drops 1 at each end
            result = self.aggregate(name, updates)
            assert result.sub(0.1).abs().max() < 0.05, name

    def test_a_client_claiming_a_huge_weight(self):
        # 4 honest clients of 100 samples send 0, one claims 1e9 samples and sends 100
        updates = [(torch.zeros(20), 100.0)] * 4 + [(torch.full((20,), 100.0), 1e9)]
        assert self.aggregate("fedavg", updates).min() > 99.99  # it dominates the weighted mean
        assert self.aggregate("median", updates).abs().max() == 0  # weights are ignored
        assert self.aggregate("trimmed-mean", updates, trim_fraction=0.2).abs().max() == 0
        # uniform weights (the server's --weighting uniform) give it 1/5
        uniform = [(d, 1.0) for d, _ in updates]
        assert close(self.aggregate("fedavg", uniform), *[20.0] * 20, tol=1e-12)
