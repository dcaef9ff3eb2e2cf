"""End to end: the real server and clients as processes on 127.0.0.1, on real MNIST in CI."""
from __future__ import annotations

import json
import socket
import time

import pytest
from procs import client_args, run, server_args, start, stop, wait_for_line


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_federation_on_mnist(tmp_path, mnist_dir, mnist_is_real, free_port):
    """Server + 2 clients, 2 short rounds, one client quantized: exits 0, learns well above chance."""
    server = start("server.py", *server_args(free_port, tmp_path, mnist_dir, 2, 2, "--test-limit", 2000),
                   log=tmp_path / "server.log")
    clients = [start("client.py", *client_args(free_port, i, 2, mnist_dir, "--limit", 2000,
                                                *(["--quantization"] if i == 1 else [])),
                     log=tmp_path / f"client{i}.log") for i in range(2)]
    try:
        assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for i, c in enumerate(clients):
            assert c.wait(timeout=30) == 0, (tmp_path / f"client{i}.log").read_text()[-2000:]
    finally:
        stop(server, *clients)
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    last = metrics[-1]
    assert last["clients"] == 2 and last["quantized"] == 1
    assert {c["quantized"] for c in last["per_client"]} == {True, False}
    # 8-bit update costs about a quarter of the float one, counted in real frame bytes.
    up = {c["client_id"]: c["bytes_up"] for c in last["per_client"]}
    assert up[1] < 0.27 * up[0]
    assert last["bytes_up"] == sum(up.values()) and last["bytes_down"] > 2 * 1_690_000
    assert last["accuracy"] > 0.7, metrics  # chance is 0.1
    assert (tmp_path / "ckpt.pt").stat().st_size > 1_600_000
    assert "round 2/2: accuracy" in (tmp_path / "server.log").read_text()


def test_clients_start_before_server(tmp_path, synthetic_mnist_dir, free_port):
    clients = [start("client.py", *client_args(free_port, i, 2, synthetic_mnist_dir), log=tmp_path / f"c{i}.log")
               for i in range(2)]
    try:
        wait_for_line(tmp_path / "c0.log", "waiting for the server", proc=clients[0])
        time.sleep(1.5)
        server = start("server.py", *server_args(free_port, tmp_path, synthetic_mnist_dir, 1, 2),
                       log=tmp_path / "server.log")
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert all(c.wait(timeout=30) == 0 for c in clients)
    finally:
        stop(*clients)
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_launcher_runs_a_federation(tmp_path, synthetic_mnist_dir):
    out = tmp_path / "run"
    r = run("simulate.py", "--clients", 2, "--rounds", 2, "--data-dir", synthetic_mnist_dir, "--out", out,
            "--quantized-clients", 1, "--quantize-broadcast", "--no-plot", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    # a mixed round: one 8-bit client, one float client, both aggregated
    assert metrics[-1]["quantized"] == 1 and metrics[-1]["clients"] == 2
    # round 2's broadcast is an 8-bit delta to the model the clients already hold
    assert metrics[1]["bytes_down"] < 0.27 * metrics[0]["bytes_down"]
    assert (out / "worker-0.log").exists() and (out / "checkpoint.pt").exists()
    assert str(out) in r.stderr


def one_error_line(output: str) -> str:
    errors = [ln for ln in output.splitlines() if "ERROR" in ln or ln.startswith("error") or "error:" in ln]
    assert len(errors) == 1, output
    assert "Traceback" not in output, output
    return errors[0]


@pytest.mark.parametrize("script", ["server.py", "client.py"])
def test_missing_data_is_one_line_and_exit_2(tmp_path, script):
    r = run(script, "--data-dir", tmp_path / "nowhere", "--no-download", "--port", 1)
    assert r.returncode == 2
    assert "train-images-idx3-ubyte.gz" in one_error_line(r.stderr + r.stdout)


def test_port_in_use(tmp_path, synthetic_mnist_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("server.py", *server_args(port, tmp_path, synthetic_mnist_dir))
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in one_error_line(r.stderr)


def test_client_id_out_of_range():
    r = run("client.py", "--client-id", 3, "--num-clients", 3)
    assert r.returncode == 2
    assert "valid: 0..2" in r.stderr and "Traceback" not in r.stderr


def test_wrong_flag_exits_2():
    r = run("server.py", "--rounds", "many")
    assert r.returncode == 2 and "invalid int value" in r.stderr


def test_unreachable_server(synthetic_mnist_dir, free_port):
    r = run("client.py", *client_args(free_port, 0, 1, synthetic_mnist_dir, "--connect-timeout", 1.5))
    assert r.returncode == 1
    assert f"cannot reach the server at 127.0.0.1:{free_port}" in one_error_line(r.stderr)


@pytest.mark.parametrize("script", ["server.py", "client.py", "simulate.py"])
def test_help(script):
    r = run(script, "--help")
    assert r.returncode == 0 and "--data-dir" in r.stdout
