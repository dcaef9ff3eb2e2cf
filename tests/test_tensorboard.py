"""--tensorboard: every round's scalars in event files, read back with TensorBoard's own
reader and compared with metrics.jsonl; under DP only what the record releases; a missing
package is one line and exit 2, on the server and on the launcher."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from procs import run, server_args, start, stop
from tensorboard.backend.event_processing.event_accumulator import SCALARS as SCALAR_EVENTS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import server
import simulate
from fl.server.evaluator import DP_RECORD_KEYS
from fl.server.tensorboard import MISSING, SCALARS, RoundScalars


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every tag's (step, value) pairs, as TensorBoard itself reads the folder."""
    acc = EventAccumulator(str(folder), size_guidance={SCALAR_EVENTS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(metrics: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the event files should hold for these records: each SCALARS key the records have."""
    return {tag: [(m["round"], pytest.approx(m[key], rel=1e-6)) for m in metrics]
            for key, tag in SCALARS.items() if key in metrics[0]}


def record(number: int, **more: float) -> dict:
    return {"round": number, "accuracy": 0.5 + number / 10, "loss": 2.0 / number, "bytes_up": 1_700_000 * number,
            "bytes_down": 3_400_000, "round_s": 1.25, "clients": 3, "participants": 3, "lr": 0.01 / number,
            "connected": 4, "per_client": [], **more}


# --- the writer -----------------------------------------------------------------------------

def test_writer_puts_each_records_scalars_at_its_round(tmp_path):
    records = [record(1), record(2)]
    scalars = RoundScalars(str(tmp_path))
    for r in records:
        scalars.write(r)
    scalars.close()
    got = read_scalars(tmp_path)
    assert got == expected(records)
    assert "privacy/epsilon" not in got  # a record without epsilon (no DP) writes none


def test_writer_under_dp_writes_epsilon_and_only_released_keys(tmp_path):
    assert set(SCALARS) <= set(DP_RECORD_KEYS) | {"epsilon"}
    scalars = RoundScalars(str(tmp_path))
    scalars.write(record(1, epsilon=0.7, delta=1e-5))
    scalars.close()
    assert read_scalars(tmp_path)["privacy/epsilon"] == [(1, pytest.approx(0.7))]


def test_a_resumed_run_replaces_the_earlier_runs_later_rounds(tmp_path):
    """A run resumed after round 1 in the same folder: TensorBoard shows one value per round,
    the new run's from round 2 on (purge_step), not two lines."""
    first = RoundScalars(str(tmp_path))
    for n in (1, 2, 3):
        first.write(record(n))
    first.close()
    again = RoundScalars(str(tmp_path), first_round=2)
    again.write(record(2, accuracy=0.99))
    again.close()
    assert read_scalars(tmp_path)["test/accuracy"] == [(1, pytest.approx(0.6)), (2, pytest.approx(0.99))]


# --- real runs ------------------------------------------------------------------------------

def federate(tmp_path: Path, data: Path, port: int, *extra: object) -> tuple[list[dict], dict]:
    """A 2-round server with --tensorboard and one worker of 2 clients; the metrics and the scalars."""
    events = tmp_path / "tb"
    srv = start("server.py", *server_args(port, tmp_path, data, 2, 2, "--test-limit", 100,
                                          "--tensorboard", events, *extra), log=tmp_path / "server.log")
    worker = start("worker.py", "--client-ids", "0-1", "--num-clients", 2, "--port", port, "--limit", 40,
                   "--data-dir", data, "--no-download", "--no-progress", log=tmp_path / "worker.log")
    try:
        assert srv.wait(timeout=180) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        stop(srv, worker)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return metrics, read_scalars(events)


def test_server_run_scalars_equal_the_metrics_file(tmp_path, synthetic_mnist_dir, free_port):
    metrics, got = federate(tmp_path, synthetic_mnist_dir, free_port)
    assert [m["round"] for m in metrics] == [1, 2]
    assert set(got) == set(SCALARS.values()) - {"privacy/epsilon"}
    assert got == expected(metrics)


def test_dp_server_run_writes_epsilon_and_nothing_per_client(tmp_path, synthetic_mnist_dir, free_port):
    metrics, got = federate(tmp_path, synthetic_mnist_dir, free_port, "--dp-noise-multiplier", "1.0",
                            "--clip-norm", "1.0", "--dp-seed", 1)
    assert all("epsilon" in m and "per_client" not in m for m in metrics)
    assert set(got) == set(SCALARS.values())
    assert got == expected(metrics)


def test_launcher_writes_into_its_run_folder_and_an_overwrite_starts_the_lines_afresh(tmp_path, synthetic_mnist_dir):
    """The launcher's default: RUN/tensorboard. Run again with --overwrite for one round: the
    folder still holds the first run's files, yet TensorBoard reads only the new round."""
    out = tmp_path / "run"
    common = ["--clients", 2, "--limit", 20, "--test-limit", 100, "--data-dir", synthetic_mnist_dir, "--out", out,
              "--no-plot"]
    for extra in (["--rounds", 2], ["--rounds", 1, "--overwrite"]):
        r = run("simulate.py", *common, *extra, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"tensorboard --logdir {out / 'tensorboard'}" in r.stderr
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == extra[1] and read_scalars(out / "tensorboard") == expected(metrics)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2


# --- the flags ------------------------------------------------------------------------------

def test_server_without_the_package_refuses_tensorboard_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: import fails
    with pytest.raises(SystemExit) as exit_:
        server.parse_args(["--tensorboard", "tb"])
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f"error: {MISSING}")
    config, _ = server.parse_args([])  # without the flag the server runs as before
    assert config.tensorboard == ""


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for parse_args in (server.parse_args, simulate.parse_args):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--tensorboard", str(tmp_path / "file" / "tb")])
        line = capsys.readouterr().err.splitlines()[-1]
        assert exit_.value.code == 2 and line.endswith(f"{tmp_path / 'file'} is not a folder this user can write to")
    config, _ = server.parse_args(["--tensorboard", str(tmp_path / "new" / "tb")])  # a folder still to be made
    assert config.tensorboard == str(tmp_path / "new" / "tb") and not (tmp_path / "new").exists()


def test_simulate_writes_into_the_run_folder_unless_told_not_to(monkeypatch, capsys):
    out = Path("runs/a")
    args, extra = simulate.parse_args([])
    command, _ = simulate.build_commands(args, extra, 9999, out, cores=2)
    assert command[command.index("--tensorboard") + 1] == str(out / "tensorboard")
    args, extra = simulate.parse_args(["--tensorboard", "elsewhere"])
    command, _ = simulate.build_commands(args, extra, 9999, out, cores=2)
    assert command[command.index("--tensorboard") + 1] == "elsewhere"
    args, extra = simulate.parse_args(["--no-tensorboard"])
    assert "--tensorboard" not in simulate.build_commands(args, extra, 9999, out, cores=2)[0]
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    args, extra = simulate.parse_args([])  # not installed: no event files by default, and no error
    assert "--tensorboard" not in simulate.build_commands(args, extra, 9999, out, cores=2)[0]
    with pytest.raises(SystemExit) as exit_:
        simulate.parse_args(["--tensorboard", "elsewhere"])
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f"error: {MISSING}")
