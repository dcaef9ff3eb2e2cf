"""--engine ray: the same workers as Ray actors on a local Ray with 2 CPUs.

Ray is an optional extra (requirements-ray.txt); this test is skipped only when it is not
importable, and CI installs it."""
from __future__ import annotations

import json

import pytest
from procs import run

pytest.importorskip("ray", reason="Ray is not installed: pip install -r requirements-ray.txt")


def test_ray_engine_runs_a_tiny_federation(tmp_path, synthetic_mnist_dir):
    out = tmp_path / "run"
    r = run("simulate.py", "--engine", "ray", "--clients", 4, "--workers", 2, "--rounds", 2, "--limit", 30,
            "--test-limit", 100, "--quantized-clients", 1, "--data-dir", synthetic_mnist_dir, "--out", out,
            "--no-plot", timeout=300, RAY_USAGE_STATS_ENABLED="0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 clients in 1 worker training on 2 Ray actors" in r.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert sorted(c["client_id"] for c in m["per_client"]) == [0, 1, 2, 3] and m["quantized"] == 1
    log = (out / "worker-0.log").read_text()  # the worker actor ran worker.py's main loop and logged here
    assert "hosting 4 clients (0-3 of 4)" in log and "training on 2 Ray actors" in log
    assert log.count("server says") == 4
