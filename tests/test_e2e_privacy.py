"""End to end with real processes: DP-FedAvg reports epsilon every round and stops before
the round that would pass --target-epsilon."""
from __future__ import annotations

import json

from procs import server_args, start, stop


def test_dp_run_reports_epsilon_and_stops_at_the_target(tmp_path, synthetic_mnist_dir, free_port):
    target = 9.0
    server = start("server.py", *server_args(free_port, tmp_path, synthetic_mnist_dir, 10, 4, "--test-limit", 100,
                                             "--dp-noise-multiplier", "1.0", "--clip-norm", "1.0",
                                             "--fraction", "0.5", "--target-epsilon", target, "--dp-seed", 1),
                   log=tmp_path / "server.log")
    worker = start("worker.py", "--client-ids", "0-3", "--num-clients", 4, "--port", free_port, "--limit", 40,
                   "--data-dir", synthetic_mnist_dir, "--no-download", "--no-progress", log=tmp_path / "worker.log")
    try:
        assert server.wait(timeout=180) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        stop(server, worker)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    eps = [m["epsilon"] for m in metrics]
    assert 1 <= len(metrics) < 10 and eps == sorted(eps) and eps[-1] <= target
    assert all(m["delta"] == metrics[0]["delta"] for m in metrics)
    log = (tmp_path / "server.log").read_text()
    assert f"stopping before round {len(metrics) + 1}" in log and "--target-epsilon" in log
    assert "seeded by --dp-seed (reproducible)" in log
    assert f"epsilon {eps[-1]:.3f}" in log  # the round's line and the summary
    worker_log = (tmp_path / "worker.log").read_text()
    assert "privacy budget spent" in worker_log  # clients are told why
