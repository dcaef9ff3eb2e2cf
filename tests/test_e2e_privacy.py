"""End to end with real processes: DP-FedAvg reports epsilon every round, stops before the
round that would pass --target-epsilon, releases nothing per client, and charges each round
at the sampling rate it realised."""
from __future__ import annotations

import json

import dp_accounting
import torch
from dp_accounting import rdp
from dp_accounting.privacy_accountant import NeighboringRelation
from procs import server_args, start, stop

from fl.privacy import PrivacyAccountant
from fl.server.checkpoint import load
from fl.server.evaluator import DP_RECORD_KEYS
from fl.server.sampling import SECRET_SAMPLING

RELEASED = set(DP_RECORD_KEYS) | {"epsilon", "delta"}


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
    assert all(set(m) <= RELEASED and (m["participants"], m["connected"]) == (2, 4) for m in metrics)
    log = (tmp_path / "server.log").read_text()
    assert f"stopping before round {len(metrics) + 1}" in log and "--target-epsilon" in log
    assert "seeded by --dp-seed (reproducible)" in log
    assert f"epsilon {eps[-1]:.3f}" in log  # the round's line and the summary
    worker_log = (tmp_path / "worker.log").read_text()
    assert "privacy budget spent" in worker_log  # clients are told why


def test_dp_run_with_three_of_ten_clients_releases_nothing_per_client_at_q_1(tmp_path, synthetic_mnist_dir,
                                                                              free_port):
    """Issue 21, items 4 and 5: ten clients declared, three connect, and after the round
    timeout the server goes on with them (--min-fit 3), sampling 3 of 3 each round. The
    rounds are charged at the realised q = 1 (dp-accounting's plain Gaussian), not at the
    declared 3/10; the metrics, the checkpoint and the log hold no per-client figure, and
    BatchNorm's counters are the server's own (one per round)."""
    rounds = 2
    server = start("server.py", *server_args(free_port, tmp_path, synthetic_mnist_dir, rounds, 10, "--test-limit", 100,
                                             "--min-fit", 3, "--fraction", "0.3", "--round-timeout", 8,
                                             "--dp-noise-multiplier", "1.0", "--clip-norm", "0.1"),
                   log=tmp_path / "server.log")
    worker = start("worker.py", "--client-ids", "0-2", "--num-clients", 10, "--port", free_port, "--limit", 40,
                   "--data-dir", synthetic_mnist_dir, "--no-download", "--no-progress", log=tmp_path / "worker.log")
    try:
        assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        stop(server, worker)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(set(m) <= RELEASED and (m["clients"], m["participants"], m["connected"]) == (3, 3, 3) for m in metrics)
    for r, m in enumerate(metrics, start=1):
        library = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        library.compose(dp_accounting.GaussianDpEvent(0.5), r)  # q = 1: the Gaussian, sensitivity 2C
        assert m["delta"] == 10 ** -1.1 and abs(m["epsilon"] - library.get_epsilon(m["delta"])) < 1e-9
        assert m["epsilon"] > PrivacyAccountant(1.0, 10, 3).epsilon_after(r)  # what the declared rate said
    saved = load(tmp_path / "ckpt.pt")
    assert saved["metrics"] == metrics and saved["privacy"]["released"] == [[1.0, 3, 3, rounds]]
    counters = [t for k, t in saved["model"].items() if k.endswith("num_batches_tracked")]
    assert counters and all(torch.equal(t, torch.tensor(rounds)) for t in counters)
    log = (tmp_path / "server.log").read_text()
    assert log.count(SECRET_SAMPLING) == 1
    assert " joined from " in log and " samples" not in log
