from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

import server
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
from fl.server.federation import Federation

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


# --- resuming: strategy state and metric records ----------------------------------------

def config_for(tmp_path: Path, *argv: str) -> ServerConfig:
    return server.parse_args(["--min-clients", "2", "--rounds", "60", "--checkpoint", str(tmp_path / "c.pt"),
                              "--metrics", str(tmp_path / "m.jsonl"), *argv])[0]


def resume_from(config: ServerConfig) -> tuple[Federation, History, object]:
    return app.build_federation(dataclasses.replace(config, resume=True))


def refused(config: ServerConfig) -> str:
    with pytest.raises(app.StartupError) as exc:
        resume_from(config)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"cannot resume from {config.checkpoint}: ")
    return str(exc.value)


def records(rounds: int) -> list[dict]:
    return [{"round": r, "accuracy": 0.5, "loss": 1.0, "bytes_up": 10, "bytes_down": 20} for r in range(1, rounds + 1)]


@pytest.mark.parametrize("argv, strategy_state, message", [
    (["--strategy", "fedavgm"], {"strategy": "fedavgm", "step": 1, "velocity": torch.zeros(10, dtype=torch.float64)},
     "saved fedavgm momentum has 10 values, expected {numel}"),
    (["--strategy", "fedadam"], {"strategy": "fedadam", "step": 2, "m": torch.zeros(10, dtype=torch.float64),
                                 "v": torch.ones(10, dtype=torch.float64)}, "saved fedadam m has 10 values, expected {numel}"),
])
def test_resume_refuses_strategy_state_of_another_model_size(tmp_path, argv, strategy_state, message):
    """Before, the first round after the resume failed in server_update on every attempt."""
    config = config_for(tmp_path, *argv)
    fed = Federation(config, app.build_strategy(config))
    save(config.checkpoint, fed.global_state, 1, records(1), config.public(), strategy=strategy_state)
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
