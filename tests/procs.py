"""Start the real server and clients as processes on 127.0.0.1 (shared by end-to-end tests)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e.pop("FL_SECRET", None)
    e.pop("MNIST_DATA_DIR", None)
    e.update(extra)
    return e


def start(script: str, *args: object, log: Path | None = None, **extra_env: str) -> subprocess.Popen:
    """Start ``python <script> args``; output goes to ``log`` (or a pipe)."""
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, text=True, env=env(**extra_env))


def run(script: str, *args: object, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env(**extra_env))


def server_args(port: int, tmp: Path, data_dir: Path, rounds: int = 2, min_clients: int = 2, *extra: object) -> list:
    return ["--port", port, "--rounds", rounds, "--min-clients", min_clients, "--data-dir", data_dir,
            "--checkpoint", tmp / "ckpt.pt", "--metrics", tmp / "metrics.jsonl", "--threads", 1,
            "--no-progress", "--no-download", *extra]


def client_args(port: int, cid: int, num: int, data_dir: Path, *extra: object) -> list:
    return ["--port", port, "--client-id", cid, "--num-clients", num, "--data-dir", data_dir, "--threads", 1,
            "--no-progress", "--no-download", *extra]


def wait_for_line(path: Path, needle: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> str:
    """Block until ``needle`` appears in the log file (or fail if the process died)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {needle!r}:\n{text[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {needle!r} in {path}:\n{path.read_text(errors='replace')[-2000:] if path.exists() else ''}")


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
