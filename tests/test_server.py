"""server.py: the command line, the config it builds, and resuming a run with its strategy state."""
from __future__ import annotations

import pytest
import torch

import server
from fl import strategies
from fl.common.layout import Layout
from fl.server import app
from fl.server import checkpoint as ckpt
from fl.server.federation import Federation, Session
from fl.wire.handshake import Peer


def test_flags_build_a_frozen_config_with_the_strategy_parameters():
    config, _ = server.parse_args(["--strategy", "fedadam", "--server-lr", "0.05", "--fraction", "0.5",
                                   "--weighting", "uniform", "--clip-norm", "2", "--no-augment"])
    assert config.strategy == "fedadam" and config.strategy_params == {"server_lr": 0.05}
    assert (config.fraction, config.weighting, config.clip_norm, config.training.augment) == (0.5, "uniform", 2.0, False)
    with pytest.raises(AttributeError):
        config.rounds = 3  # frozen
    assert "secret" not in str(config.public())


def test_the_clients_optimizer_reaches_the_training_config_every_client_is_sent():
    assert server.parse_args([])[0].training_config().optimizer == "adam"  # the default is unchanged
    config, _ = server.parse_args(["--client-optimizer", "sgd", "--client-momentum", "0.9", "--lr", "0.05"])
    sent = config.training_config().to_wire()
    assert (sent["optimizer"], sent["momentum"], config.training.lr) == ("sgd", 0.9, 0.05)
    assert sent["freeze_bn"] is False


def test_freeze_bn_after_round_r_tells_clients_from_round_r_plus_1():
    config, _ = server.parse_args(["--freeze-bn-after", "3"])
    assert [config.training_config(r).freeze_bn for r in (1, 3, 4, 9)] == [False, False, True, True]
    assert server.parse_args(["--freeze-bn-after", "0"])[0].training_config(1).freeze_bn is True


def test_every_strategy_is_listed_in_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        server.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in strategies.available():
        assert name in text


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "nope"], "invalid choice"),
    (["--strategy", "fedprox", "--mu", "-1"], "--mu must be >= 0"),
    (["--fraction", "0"], "--fraction must be in (0, 1]"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
    (["--strategy", "trimmed-mean", "--trim-fraction", "0.5"], "--trim-fraction must be in [0, 0.5)"),
    (["--strategy", "fedavg", "--mu", "0.1"], "--mu is not a parameter of fedavg"),
    (["--clip-norm", "0"], "--clip-norm must be positive"),
    (["--norm-ratio", "0.5"], "--norm-ratio must be > 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--freeze-bn-after", "-1"], "--freeze-bn-after must be >= 0"),
    (["--client-optimizer", "sgd", "--client-momentum", "1"], "--client-momentum must be in [0, 1)"),
    (["--client-momentum", "0.9"], "--client-momentum needs --client-optimizer sgd"),
    (["--client-optimizer", "rmsprop"], "invalid choice"),
])
def test_bad_parameters_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        server.parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("server.py: error:") or message in err[-1]


def run_rounds(fed: Federation, numbers, seed_base=0):
    """Rounds of two clients whose deltas depend only on the round number."""
    sessions = [Session(Peer(i, 100, {}), f"t:{i}") for i in range(2)]
    for s in sessions:
        fed.sessions[s.client_id] = s
    for number in numbers:
        rnd, task = fed.open_round(number, 0, dict(fed.sessions))
        for s in sessions:
            g = torch.Generator().manual_seed(seed_base + 10 * number + s.client_id)
            local = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                     for k, v in task.base.items()}
            fed.submit(s, task, {"round": number, "num_samples": 100, "metrics": {}, "quantized": False,
                                 "flat": Layout.of(local).pack(local)}, 1, 1)
        fed.close_round(rnd)
        assert fed.finish_round(rnd) is not None


def test_resume_restores_the_strategy_state_and_continues_like_an_uninterrupted_run(tmp_path):
    argv = ["--strategy", "fedadam", "--rounds", "4", "--checkpoint", str(tmp_path / "c.pt")]
    config, _ = server.parse_args(argv)
    torch.manual_seed(0)
    straight = Federation(config, strategies.make("fedadam", **config.strategy_params))
    run_rounds(straight, [1, 2, 3, 4])

    torch.manual_seed(0)
    first = Federation(config, strategies.make("fedadam", **config.strategy_params))
    run_rounds(first, [1, 2])
    ckpt.save(config.checkpoint, first.global_state, 2, [], config.public(), strategy=first.strategy.state_dict())
    resumed_config, _ = server.parse_args(argv + ["--resume"])
    torch.manual_seed(123)  # a different initial model: everything must come from the checkpoint
    second = Federation(resumed_config, strategies.make("fedadam"))
    app.resume(second, resumed_config)
    assert second.start_round == 2 and second.strategy.step == 2
    run_rounds(second, [3, 4])
    for key in ("m", "v"):
        assert torch.equal(second.strategy.state_dict()[key], straight.strategy.state_dict()[key])
    for k, v in straight.global_state.items():
        assert torch.equal(second.global_state[k], v), k


@pytest.mark.parametrize("tamper, message", [
    (lambda s: s.update(round="2"), "round"),
    (lambda s: s.update(round=99), "round"),
    (lambda s: s["model"].update({"classifier.4.bias": torch.full((10,), float("nan"))}), "NaN"),
    (lambda s: s["model"].update({"features.1.running_var": -torch.ones(32)}), "negative variances"),
    (lambda s: s.update(torch_rng=torch.zeros(3, dtype=torch.uint8)), "RNG"),
    (lambda s: s.update(python_rng=[3, "x", None]), "RNG"),
])
def test_resume_refuses_a_tampered_checkpoint(tmp_path, tamper, message):
    config, _ = server.parse_args(["--checkpoint", str(tmp_path / "c.pt"), "--rounds", "5"])
    fed = Federation(config, strategies.make("fedavg"))
    ckpt.save(config.checkpoint, fed.global_state, 1, [], config.public())
    state = ckpt.load(config.checkpoint)
    state["model"] = dict(state["model"])
    tamper(state)
    with pytest.raises(ValueError, match=message):
        ckpt.check(state, fed.global_state, config.rounds)


@pytest.mark.parametrize("argv, message", [
    (["--dp-noise-multiplier", "1"], "needs --clip-norm"),
    (["--dp-noise-multiplier", "1", "--clip-norm", "1", "--weighting", "samples"], "needs --weighting uniform"),
    (["--dp-noise-multiplier", "1", "--clip-norm", "1", "--strategy", "median"], "replaces the mean"),
    (["--target-epsilon", "2"], "need --dp-noise-multiplier"),
    (["--dp-noise-multiplier", "-1", "--clip-norm", "1"], "--dp-noise-multiplier must be >= 0"),
])
def test_bad_privacy_settings_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        server.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_dp_wraps_the_strategy_and_the_accountant_sees_m_of_n():
    config, _ = server.parse_args(["--dp-noise-multiplier", "1.0", "--clip-norm", "2", "--min-clients", "100",
                                   "--fraction", "0.1", "--strategy", "fedadam", "--dp-seed", "3"])
    assert config.weighting == "uniform"  # the default under DP
    strategy = app.build_strategy(config)
    accountant = app.build_accountant(config, strategy)
    assert strategy.inner.name == "fedadam" and strategy.clip_norm == 2.0
    assert (accountant.num_clients, accountant.clients_per_round) == (100, 10)
    assert accountant.delta == pytest.approx(100 ** -1.1)


def test_under_dp_the_federation_neither_screens_nor_clips_and_fixes_m_per_round():
    config, _ = server.parse_args(["--dp-noise-multiplier", "0", "--clip-norm", "0.5", "--min-clients", "2",
                                   "--dp-seed", "0"])
    fed = Federation(config, app.build_strategy(config))
    assert fed.norm_ratio is None and fed.clip_norm is None
    sessions = [Session(Peer(i, 100, {}), f"t:{i}") for i in range(2)]
    for s in sessions:
        fed.sessions[s.client_id] = s
    rnd, task = fed.open_round(1, 0, dict(fed.sessions))
    assert fed.strategy.sampled == 2
    local = {k: v + 1.0 if v.is_floating_point() else v for k, v in task.base.items()}  # a long delta
    fed.submit(sessions[0], task, {"round": 1, "num_samples": 100, "metrics": {}, "quantized": False,
                                   "flat": Layout.of(local).pack(local)}, 1, 1)
    fed.close_round(rnd)  # one of the two sampled clients dropped out: still divided by m = 2
    got = fed.finish_round(rnd)
    moved = Layout.of(got).flatten(got)[0] - task.base_floats
    assert float(moved.double().norm()) == pytest.approx(0.5 / 2, rel=1e-4)


class FailingFromRound2(Federation):
    """Round 1 completes (two clients report); every attempt of round 2 gets no update."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: list[tuple[int, int]] = []
        for i in range(2):
            self.sessions[i] = Session(Peer(i, 100, {}), f"t:{i}")

    def run_round(self, number: int, attempt: int = 0):
        self.attempts.append((number, attempt))
        if len(self.attempts) > 8:  # a run without the cap would retry forever: end it here
            self.stop.set()
        rnd, task = self.open_round(number, attempt, dict(self.sessions))
        for s in self.sessions.values() if number == 1 else ():
            local = {k: v + 0.01 if v.is_floating_point() else v for k, v in task.base.items()}
            self.submit(s, task, {"round": number, "num_samples": 100, "metrics": {}, "quantized": False,
                                  "flat": Layout.of(local).pack(local)}, 1, 1)
        self.close_round(rnd)
        return rnd


def test_a_round_that_keeps_failing_stops_the_run_at_max_attempts_and_keeps_the_checkpoint(tmp_path, caplog):
    config, _ = server.parse_args(["--rounds", "5", "--max-attempts", "3", "--round-timeout", "0.1",
                                   "--checkpoint", str(tmp_path / "c.pt"), "--metrics", str(tmp_path / "m.jsonl"),
                                   "--no-progress", "--quiet"])
    fed = FailingFromRound2(config, strategies.make("fedavg"))
    fed.start_round = 0
    test_set = (torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with caplog.at_level("ERROR", logger="server"):
        status = app.run(fed, config, ckpt.History(), test_set)
    assert status == 1
    assert fed.attempts == [(1, 0), (2, 0), (2, 1), (2, 2)]  # three attempts of round 2, no fourth
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert lines == ["round 2 failed 3 attempts in a row (--max-attempts 3): stopping; the checkpoint keeps round 1"]
    saved = ckpt.load(config.checkpoint)
    assert saved["round"] == 1 and len(saved["metrics"]) == 1  # round 1, written before the run stopped


@pytest.mark.parametrize("value", ["0", "-2"])
def test_max_attempts_below_one_is_one_line_and_exit_2(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        server.parse_args(["--max-attempts", value])
    assert exit_.value.code == 2 and "--max-attempts must be at least 1" in capsys.readouterr().err
    assert server.parse_args([])[0].max_attempts == 10
