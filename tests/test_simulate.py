"""The launcher: its arguments and commands (in-process), and real runs with workers."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from procs import run

import simulate


def commands(*argv: str, cores: int = 2):
    args, extra = simulate.parse_args(list(argv))
    return simulate.build_commands(args, extra, 9999, Path("/tmp/run"), cores=cores)


def flag(cmd: list[str], name: str) -> str:
    return cmd[len(cmd) - 1 - cmd[::-1].index(name) + 1]  # the last occurrence wins, as in argparse


def test_default_workers_and_split():
    assert simulate.default_workers(3, 2) == 3  # the quickstart: a worker per client
    assert simulate.default_workers(4, 2) == 4
    assert simulate.default_workers(100, 2) == 2  # one per core
    assert [len(s) for s in simulate.split_clients(10, 3)] == [4, 3, 3]
    assert sum(simulate.split_clients(100, 7), []) == list(range(100))
    assert simulate.format_ids([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert simulate.threads_per_worker(2, 2) == 1 and simulate.threads_per_worker(3, 2) == 1
    assert simulate.threads_per_worker(1, 4) == 4


def test_hundred_clients_train_on_two_processes_of_one_worker():
    """Locally, one worker holds every connection and trains on a pool: an uneven sample
    cannot leave a core idle."""
    server, workers = commands("--clients", "100", "--fraction", "0.1", "--rounds", "5", "--quantized-clients", "60")
    assert flag(server, "--min-clients") == "100" and int(flag(server, "--max-connections")) >= 100 + 32
    assert flag(server, "--fraction") == "0.1" and flag(server, "--rounds") == "5"
    assert len(workers) == 1 and flag(workers[0], "--trainers") == "2"
    assert flag(workers[0], "--client-ids") == "0-99" and flag(workers[0], "--quantize-ids") == "0-59"
    assert flag(workers[0], "--num-clients") == "100" and flag(workers[0], "--port") == "9999"
    assert flag(workers[0], "--threads") == "1"  # per training process: two on two cores
    assert "--host" not in workers[0]  # the worker's default, 127.0.0.1


def test_hosting():
    assert simulate.hosting(100, 4) == ([list(range(100))], 4)
    assert simulate.hosting(3, 3) == ([[0], [1], [2]], 1)  # a worker per client: nothing to balance
    assert simulate.hosting(2, 2) == ([[0], [1]], 1)


def test_quickstart_is_a_worker_per_client():
    server, workers = commands("--clients", "3")
    assert [flag(w, "--client-ids") for w in workers] == ["0", "1", "2"]
    assert "--fraction" not in server and "--strategy" not in server  # only passed when given
    assert flag(server, "--max-connections") == "128"


def test_unknown_flags_go_to_the_server_last():
    server, _ = commands("--clients", "4", "--strategy", "fedadam", "--server-lr", "0.01",
                         "--round-timeout=30", "--min-clients", "2")
    assert flag(server, "--strategy") == "fedadam"
    assert server[-5:] == ["--server-lr", "0.01", "--round-timeout=30", "--min-clients", "2"]
    assert flag(server, "--min-clients") == "2"  # an explicit server flag wins


def test_a_server_flag_that_starts_like_a_launcher_flag_still_goes_to_the_server():
    # argparse would read --mode as an abbreviation of the launcher's --model
    server, workers = commands("--clients", "2", "--mode", "async", "--concurrency", "2")
    assert flag(server, "--mode") == "async" and flag(server, "--concurrency") == "2"
    assert all("--model" not in w or flag(w, "--model") != "async" for w in workers)


def test_workers_more_than_clients_and_cluster_hosts():
    server, workers = commands("--clients", "2", "--workers", "8", "--engine", "ray",
                               "--ray-address", "head:6379", "--connect-host", "10.0.0.5")
    assert len(workers) == 2 and flag(server, "--host") == "0.0.0.0"
    assert all(flag(w, "--host") == "10.0.0.5" for w in workers)


@pytest.mark.parametrize("argv,msg", [
    (["--clients", "0"], "at least 1"),
    (["--workers", "0"], "--workers"),
    (["--fraction", "1.5"], "--fraction"),
    (["--ray-address", "auto"], "--engine ray"),
    (["--checkpoint", "x.pt"], "set by the launcher"),
    (["--metrics=m.jsonl"], "set by the launcher"),
])
def test_bad_launcher_args(capsys, argv, msg):
    with pytest.raises(SystemExit) as exc:
        simulate.parse_args(argv)
    assert exc.value.code == 2 and msg in capsys.readouterr().err


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_launcher_twelve_clients_on_two_training_processes(tmp_path, synthetic_mnist_dir):
    out = tmp_path / "run"
    r = run("simulate.py", "--clients", 12, "--workers", 2, "--rounds", 1, "--limit", 20, "--test-limit", 100,
            "--partition", "shards", "--quantized-clients", 3, "--data-dir", synthetic_mnist_dir, "--out", out,
            "--no-plot", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    (m,) = read_metrics(out / "metrics.jsonl")
    assert sorted(c["client_id"] for c in m["per_client"]) == list(range(12)) and m["quantized"] == 3
    assert "12 clients in 1 worker training on 2 processes" in r.stderr
    log = (out / "worker-0.log").read_text()
    assert "hosting 12 clients (0-11 of 12)" in log and "training on 2 processes" in log
    assert log.count("server says") == 12 and not (out / "worker-1.log").exists()


def test_launcher_server_failure_stops_the_workers(tmp_path, synthetic_mnist_dir):
    """A flag neither the launcher nor the server knows: the server's one-line error, its
    exit status, and no worker left behind waiting for it."""
    start = time.monotonic()
    r = run("simulate.py", "--clients", 2, "--rounds", 1, "--no-such-flag", "--data-dir", synthetic_mnist_dir,
            "--out", tmp_path / "run", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "unrecognized arguments: --no-such-flag" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - start < 60  # not the workers' 120 s retry window


def test_launcher_missing_data_is_one_line(tmp_path):
    r = run("simulate.py", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "run", "--no-plot",
            timeout=120, MNIST_DATA_DIR="")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: MNIST not found"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_launcher_without_ray_says_how_to_get_it(tmp_path, synthetic_mnist_dir, monkeypatch, capsys):
    """--engine ray without Ray installed: one line naming requirements-ray.txt, exit 2."""
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    status = simulate.main(["--engine", "ray", "--data-dir", str(synthetic_mnist_dir), "--out", str(tmp_path / "r")])
    assert status == 2
    assert "error: --engine ray needs Ray: pip install -r requirements-ray.txt" in capsys.readouterr().err


def test_a_launcher_run_resumes_where_it_stopped(tmp_path, synthetic_mnist_dir):
    """Two rounds, then the same folder with --resume up to three: the server continues
    from the checkpoint, and the metrics file holds rounds 1..3 with round 3's accuracy.
    Without --resume or --overwrite the folder is refused."""
    out = tmp_path / "run"
    common = ["--clients", 2, "--limit", 20, "--test-limit", 100, "--data-dir", synthetic_mnist_dir, "--out", out,
              "--no-plot"]
    first = run("simulate.py", *common, "--rounds", 2, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [m["round"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2]
    refused = run("simulate.py", *common, "--rounds", 3, timeout=60)
    assert refused.returncode == 2 and "a previous run's files are here" in refused.stderr
    resumed = run("simulate.py", *common, "--rounds", 3, "--resume", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "after round 2" in resumed.stderr
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert isinstance(metrics[2]["accuracy"], float) and 0 <= metrics[2]["accuracy"] <= 1
