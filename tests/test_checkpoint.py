from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from dp_accounting.privacy_accountant import NeighboringRelation
from tqdm import tqdm

import server
from fl.common.layout import Layout
from fl.learning.model import ImprovedCNN
from fl.server import app, checkpoint
from fl.server.checkpoint import (
    FORMAT,
    History,
    append_metrics,
    atomic_write,
    check_records,
    load,
    read_metrics,
    restore_rng,
    rewrite_metrics,
    save,
)
from fl.server.config import ServerConfig
from fl.server.evaluator import DP_RECORD_KEYS, Evaluator, Finished
from fl.server.federation import Federation, RoundState, Session
from fl.wire.handshake import Peer

METRICS = [
    {"round": 1, "accuracy": 0.91, "loss": 0.3, "clients": [1, 2]},
    {"round": 2, "accuracy": 0.95, "loss": 0.15, "clients": [1, 2, 3], "note": "ok"},
]
CONFIG = {"rounds": 5, "lr": 0.01, "quantization": False, "name": "run"}


class Evil:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.fixture(scope="module")
def model_state():
    torch.manual_seed(0)
    m = ImprovedCNN().train()
    m(torch.randn(4, 1, 28, 28))
    return m.state_dict()


def leftovers(directory: Path, keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


# --- save / load ------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, model_state):
    path = tmp_path / "ckpt.pt"
    save(path, model_state, 2, METRICS, CONFIG)
    state = load(path)
    assert state["format"] == FORMAT
    assert state["round"] == 2
    assert state["metrics"] == METRICS
    assert state["config"] == CONFIG
    assert state["model"].keys() == model_state.keys()
    for k, v in model_state.items():
        assert state["model"][k].dtype == v.dtype
        assert torch.equal(state["model"][k], v), k
    ImprovedCNN().load_state_dict(state["model"])
    assert leftovers(tmp_path, "ckpt.pt") == []


def test_save_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "ckpt.pt"
    save(path, {"w": torch.ones(2)}, 1, [], {})
    assert load(path)["round"] == 1


def test_save_overwrites_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save(path, {"w": torch.zeros(3)}, 1, METRICS[:1], CONFIG)
    save(path, {"w": torch.ones(3)}, 2, METRICS, CONFIG)
    state = load(path)
    assert state["round"] == 2 and state["metrics"] == METRICS
    assert torch.equal(state["model"]["w"], torch.ones(3))
    assert leftovers(tmp_path, "ckpt.pt") == []


def test_atomic_write_success_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write(path, lambda f: f.write(b"hello"))
    assert path.read_bytes() == b"hello"
    assert leftovers(tmp_path, "out.bin") == []


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path, model_state):
    path = tmp_path / "ckpt.pt"
    save(path, model_state, 3, METRICS, CONFIG)
    before = path.read_bytes()

    def torn(f):
        f.write(b"partial garbage" * 1000)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, torn)
    assert path.read_bytes() == before
    assert load(path)["round"] == 3
    assert leftovers(tmp_path, "ckpt.pt") == []


def test_atomic_write_failure_with_keyboard_interrupt(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")

    def interrupted(f):
        f.write(b"new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path, "ckpt.pt") == []


def test_atomic_write_failure_without_existing_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(ValueError):
        atomic_write(path, lambda f: (_ for _ in ()).throw(ValueError("boom")))
    assert list(tmp_path.iterdir()) == []


def test_save_failure_midway_keeps_old_checkpoint(tmp_path, monkeypatch, model_state):
    path = tmp_path / "ckpt.pt"
    save(path, model_state, 4, METRICS, CONFIG)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("no space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError):
        save(path, {"w": torch.ones(1)}, 5, [], {})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load(path)["round"] == 4
    assert leftovers(tmp_path, "ckpt.pt") == []


def test_load_bare_state_dict(tmp_path, model_state):
    path = tmp_path / "weights.pt"
    torch.save(model_state, path)
    state = load(path)
    assert state["round"] == 0
    assert state["metrics"] == [] and state["config"] == {}
    for k, v in model_state.items():
        assert torch.equal(state["model"][k], v)


def test_format_1_checkpoint_still_loads(tmp_path, model_state):
    """Checkpoints of the previous format pickled metrics and the RNG state as objects."""
    path = tmp_path / "old.pt"
    random.seed(3)
    torch.save({"format": 1, "round": 2, "model": model_state, "metrics": METRICS, "config": CONFIG,
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, path)
    expected = [random.random() for _ in range(3)]
    state = load(path)
    assert state["round"] == 2 and state["metrics"] == METRICS
    random.seed(99)
    restore_rng(state)
    assert [random.random() for _ in range(3)] == expected


@pytest.mark.parametrize("as_history", [False, True])
def test_metrics_are_stored_as_one_json_string(tmp_path, model_state, as_history):
    path = tmp_path / "ckpt.pt"
    save(path, model_state, 2, History(METRICS) if as_history else METRICS, CONFIG)
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw["metrics"], str) and json.loads(raw["metrics"]) == METRICS
    assert load(path)["metrics"] == METRICS


def test_history_encodes_each_record_once(monkeypatch):
    history = History(METRICS[:1])
    calls = []
    real_dumps = checkpoint.json.dumps
    monkeypatch.setattr(checkpoint.json, "dumps", lambda obj, *a, **k: calls.append(obj) or real_dumps(obj, *a, **k))
    history.append(METRICS[1])
    for _ in range(3):
        assert json.loads(history.to_json()) == METRICS
    assert calls == [METRICS[1]]  # only the new record was encoded
    assert len(history) == 2 and history[-1] == METRICS[1] and list(history) == METRICS


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", bytes(range(256)) * 8])
def test_load_garbage_raises_value_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        load(path)


def test_load_truncated_checkpoint_raises_value_error(tmp_path, model_state):
    path = tmp_path / "ckpt.pt"
    save(path, model_state, 1, [], {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load(path)


@pytest.mark.parametrize("obj", [
    [1, 2, 3],
    {"format": FORMAT + 1, "model": {}},
    {"format": FORMAT, "round": 1},  # no model
    {"format": FORMAT, "round": 1, "model": {}, "metrics": "{not json", "python_rng": "[]"},
    {"format": FORMAT, "round": 1, "model": {}, "metrics": 5, "python_rng": "[]"},
    {"round": 1, "model": {}},  # no format, not a bare state dict
    torch.zeros(3),
])
def test_load_wrong_structure_raises_value_error(tmp_path, obj):
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError):
        load(path)


def test_load_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.pt")


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_load_refuses_hostile_pickle(tmp_path, how):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT, "round": 1, "model": {}, "x": Evil(f"touch {marker}")}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError):
        load(path)
    assert not marker.exists()


def test_hostile_checkpoint_control_is_really_hostile(tmp_path):
    """Sanity check for the test above: an unrestricted load does run the command."""
    marker = tmp_path / "CONTROL"
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil(f"touch {marker}")}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


# --- RNG --------------------------------------------------------------------------------

def test_restore_rng_restores_torch_and_python_rng(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.manual_seed(123)
    random.seed(456)
    save(path, {"w": torch.ones(1)}, 1, [], {})
    expected_t = torch.rand(10)
    expected_p = [random.random() for _ in range(5)]
    # move both generators somewhere else entirely
    torch.manual_seed(999)
    random.seed(999)
    torch.rand(100)
    assert not torch.equal(torch.rand(10), expected_t)
    restore_rng(load(path))
    assert torch.equal(torch.rand(10), expected_t)
    assert [random.random() for _ in range(5)] == expected_p


def test_restore_rng_tolerates_bare_state_dict(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(1)}, path)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    restore_rng(load(path))  # nothing to restore: must not raise or change the RNG
    assert torch.equal(torch.rand(3), expected)


# --- metrics file -----------------------------------------------------------------------

def test_metrics_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rewrite_metrics(path, METRICS)
    assert read_metrics(path) == METRICS
    extra = {"round": 3, "accuracy": 0.97, "loss": 0.1, "clients": []}
    append_metrics(path, extra)
    assert read_metrics(path) == METRICS + [extra]
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    assert leftovers(tmp_path, "metrics.jsonl") == []


def test_rewrite_metrics_replaces_longer_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for i in range(5):
        append_metrics(path, {"round": i + 1})
    rewrite_metrics(path, [{"round": 1}, {"round": 2}])
    assert read_metrics(path) == [{"round": 1}, {"round": 2}]
    rewrite_metrics(path, [])
    assert read_metrics(path) == []
    assert path.exists()


def test_rewrite_metrics_accepts_generator(tmp_path):
    path = tmp_path / "m.jsonl"
    rewrite_metrics(path, ({"round": i} for i in range(3)))
    assert read_metrics(path) == [{"round": 0}, {"round": 1}, {"round": 2}]


def test_read_metrics_skips_blank_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"round": 1}\n\n   \n{"round": 2}\n')
    assert read_metrics(path) == [{"round": 1}, {"round": 2}]


def test_append_metrics_creates_file(tmp_path):
    path = tmp_path / "new.jsonl"
    append_metrics(path, {"round": 1, "acc": 0.5})
    assert read_metrics(path) == [{"round": 1, "acc": 0.5}]


# --- what a DP run writes, and resuming from it ------------------------------------------

TINY_TEST_SET = (torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
DP_FLAGS = ["--dp-noise-multiplier", "0.5", "--clip-norm", "0.1", "--dp-seed", "0"]


def config_for(tmp_path: Path, *argv: str) -> ServerConfig:
    return server.parse_args(["--min-clients", "2", "--rounds", "60", "--checkpoint", str(tmp_path / "c.pt"),
                              "--metrics", str(tmp_path / "m.jsonl"), *argv])[0]


def one_round(fed: Federation, number: int) -> tuple[RoundState, dict[str, torch.Tensor]]:
    """Clients 0 and 1 send long deltas (norm ~ 60) and report loss 0.4321, accuracy 0.8765."""
    sessions = {cid: Session(Peer(cid, 100, {}), f"t:{cid}") for cid in (0, 1)}
    fed.sessions.update(sessions)
    rnd, task = fed.open_round(number, 0, dict(fed.sessions))
    for cid, s in sessions.items():
        local = {k: v + 0.05 * (cid + 1) if v.is_floating_point() else v for k, v in task.base.items()}
        fed.submit(s, task, {"round": number, "num_samples": 77 + cid, "quantized": False,
                             "metrics": {"loss": 0.4321, "accuracy": 0.8765, "train_s": 1.5},
                             "flat": Layout.of(local).pack(local)}, 1000, 2000)
    fed.close_round(rnd)
    state = fed.finish_round(rnd)
    assert state is not None
    return rnd, state


def run_and_checkpoint(config: ServerConfig, rounds: int) -> tuple[Federation, object]:
    """``rounds`` rounds as app.run commits them: the accountant steps at the realised rate,
    the evaluator writes the metrics and the checkpoint."""
    fed = Federation(config, app.build_strategy(config))
    accountant = app.build_accountant(config, fed.strategy)
    evaluator = Evaluator(config, TINY_TEST_SET, History(), tqdm(disable=True), on_failure=lambda: None)
    for number in range(1, rounds + 1):
        rnd, state = one_round(fed, number)
        extra, privacy = {}, None
        if accountant is not None:
            accountant.step(rnd.connected, len(rnd.participants))
            extra, privacy = {"epsilon": accountant.epsilon(), "delta": accountant.delta}, accountant.state_dict()
        evaluator.submit(Finished(rnd, state, fed.strategy.state_dict(), extra, privacy))
    evaluator.close()
    return fed, accountant


@pytest.mark.parametrize("dp_on", [True, False])
def test_under_dp_no_per_client_record_reaches_the_metrics_or_the_checkpoint(tmp_path, dp_on):
    config = config_for(tmp_path, *(DP_FLAGS if dp_on else []))
    run_and_checkpoint(config, 1)
    [written] = read_metrics(config.metrics)
    saved = load(config.checkpoint)
    assert saved["metrics"] == [written]
    text = Path(config.metrics).read_text()
    if dp_on:
        assert set(written) <= set(DP_RECORD_KEYS) | {"epsilon", "delta"}
        assert "per_client" not in written and "sampled" not in written and "samples" not in written
        assert "0.4321" not in text and "0.8765" not in text and "norm" not in text
        assert (written["clients"], written["participants"], written["connected"]) == (2, 2, 2)
        assert saved["privacy"]["released"] == [[0.5, 2, 2, 1]]
    else:
        assert [c["client_id"] for c in written["per_client"]] == [0, 1] == written["sampled"]
        assert {c["loss"] for c in written["per_client"]} == {0.4321} and written["samples"] == 155
        assert all(c["norm"] > 1 for c in written["per_client"])
        assert saved["privacy"] is None


def resume_from(config: ServerConfig) -> tuple[Federation, History, object]:
    return app.build_federation(dataclasses.replace(config, resume=True))


def test_resume_takes_over_the_accountant(tmp_path):
    config = config_for(tmp_path, *DP_FLAGS)
    _, first = run_and_checkpoint(config, 3)
    fed, history, accountant = resume_from(config)
    assert fed.start_round == 3 and len(history) == 3
    assert accountant.rounds == 3 and accountant.epsilon() == pytest.approx(first.epsilon(), rel=1e-12)
    assert history[-1]["epsilon"] == pytest.approx(accountant.epsilon(), rel=1e-12)


def test_resume_with_another_noise_multiplier_accounts_each_round_at_its_own(tmp_path):
    config = config_for(tmp_path, *DP_FLAGS)
    run_and_checkpoint(config, 3)
    louder = config_for(tmp_path, "--dp-noise-multiplier", "2", "--clip-norm", "0.1", "--dp-seed", "0")
    _, _, accountant = resume_from(louder)
    accountant.step(2, 2)
    acc = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(2, 2, dp_accounting.GaussianDpEvent(0.25)), 3)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(2, 2, dp_accounting.GaussianDpEvent(1.0)), 1)
    assert accountant.epsilon() == pytest.approx(acc.get_epsilon(accountant.delta), rel=1e-12)


def refused(config: ServerConfig) -> str:
    with pytest.raises(app.StartupError) as exc:
        resume_from(config)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"cannot resume from {config.checkpoint}: ")
    return str(exc.value)


def records(rounds: int) -> list[dict]:
    return [{"round": r, "accuracy": 0.5, "loss": 1.0, "bytes_up": 10, "bytes_down": 20} for r in range(1, rounds + 1)]


def test_the_issue_example_fifty_rounds_without_noise_then_z_5_is_refused(tmp_path):
    """Issue 21, item 5: 50 rounds without noise, resumed with z = 5 (N = 100, m = 10)
    reported epsilon 1.57, the 50 rounds re-accounted as if noised. No epsilon covers them."""
    plain = config_for(tmp_path, "--min-clients", "100", "--fraction", "0.1")
    fed = Federation(plain, app.build_strategy(plain))
    save(plain.checkpoint, fed.global_state, 50, records(50), plain.public())
    dp_config = config_for(tmp_path, "--min-clients", "100", "--fraction", "0.1", "--dp-noise-multiplier", "5",
                           "--clip-norm", "1")
    assert "its 50 rounds have no privacy accountant state" in refused(dp_config)
    fed, _, accountant = resume_from(plain)  # the same checkpoint without DP still resumes
    assert fed.start_round == 50 and accountant is None


def test_a_checkpoint_whose_accountant_misses_rounds_is_refused(tmp_path):
    config = config_for(tmp_path, *DP_FLAGS)
    run_and_checkpoint(config, 2)
    saved = load(config.checkpoint)
    saved["privacy"]["released"] = [[0.5, 2, 2, 1]]
    save(config.checkpoint, saved["model"], 2, saved["metrics"], saved["config"], privacy=saved["privacy"])
    assert "charged 1 rounds, the checkpoint has 2" in refused(config)


@pytest.mark.parametrize("argv, strategy_state, message", [
    (["--strategy", "fedavgm"], {"strategy": "fedavgm", "step": 1, "velocity": torch.zeros(10, dtype=torch.float64)},
     "saved fedavgm momentum has 10 values, expected {numel}"),
    (["--strategy", "fedadam"], {"strategy": "fedadam", "step": 2, "m": torch.zeros(10, dtype=torch.float64),
                                 "v": torch.ones(10, dtype=torch.float64)}, "saved fedadam m has 10 values, expected {numel}"),
    (["--strategy", "fedyogi", *DP_FLAGS], {"inner": {"strategy": "fedyogi", "step": 2, "m": torch.zeros(10, dtype=torch.float64),
                                                      "v": torch.ones(10, dtype=torch.float64)}},
     "saved fedyogi m has 10 values, expected {numel}"),
])
def test_resume_refuses_strategy_state_of_another_model_size(tmp_path, argv, strategy_state, message):
    """Before, the first round after the resume failed in server_update on every attempt."""
    config = config_for(tmp_path, *argv)
    fed = Federation(config, app.build_strategy(config))
    privacy = {"sampling": "fixed", "delta": 0.1, "released": [[0.5, 2, 2, 1]]} if config.dp else None
    save(config.checkpoint, fed.global_state, 1, records(1), config.public(), strategy=strategy_state, privacy=privacy)
    assert message.format(numel=fed.layout.float_numel) in refused(config)


@pytest.mark.parametrize("metrics, message", [
    ([{}], "metrics record 1 has no valid 'round'"),
    ([{"round": 1, "accuracy": 0.5, "loss": 1.0, "bytes_down": 3}], "metrics record 1 has no valid 'bytes_up'"),
    (records(1) + [{**records(1)[0], "accuracy": "high"}], "metrics record 2 has no valid 'accuracy'"),
    ([{**records(1)[0], "bytes_up": True}], "no valid 'bytes_up'"),
    (list(reversed(records(2))), "metrics record 2 is for round 1, expected one in 3..2"),
    (records(3), "metrics record 3 is for round 3, expected one in 3..2"),
    ({"round": 1}, "metrics are not a list of records"),
])
def test_resume_refuses_metric_records_the_run_cannot_read(tmp_path, metrics, message):
    """metrics=[{}] passed the old check, then stopped the run with KeyError 'bytes_up'."""
    config = config_for(tmp_path)
    fed = Federation(config, app.build_strategy(config))
    save(config.checkpoint, fed.global_state, 2, [], config.public())
    raw = torch.load(config.checkpoint, weights_only=True)
    raw["metrics"] = json.dumps(metrics)
    torch.save(raw, config.checkpoint)
    assert message in refused(config)
    check_records(records(2), 2)  # a good history passes
