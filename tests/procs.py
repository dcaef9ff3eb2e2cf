"""Shared test helpers: the real server and clients as processes on 127.0.0.1, and a
thread that hands its result or exception back to the test."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
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


class Worker(threading.Thread):
    """Run ``fn`` in a daemon thread and hand back its result or exception."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.result = None
        self.error: BaseException | None = None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self.error = exc

    def get(self, timeout: float = 10.0):
        self.join(timeout)
        assert not self.is_alive(), "worker thread hung"
        if self.error is not None:
            raise self.error
        return self.result

    def outcome(self, timeout: float = 10.0):
        """The result, or the exception the thread raised (returned, not raised)."""
        self.join(timeout)
        assert not self.is_alive(), "worker thread hung"
        return self.error if self.error is not None else self.result


def log_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def expect_exit(proc: subprocess.Popen, log: Path, timeout: float = 120, code: int = 0) -> None:
    """Wait for ``proc`` to end with ``code``; on failure, the tail of its log."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"{log.name} did not exit within {timeout} s:\n{log_of(log)[-3000:]}")
    assert rc == code, f"{log.name} exited {rc}, expected {code}:\n{log_of(log)[-3000:]}"


def expect_run(server: subprocess.Popen, server_log: Path, clients: list[tuple[subprocess.Popen, Path]],
               timeout: float = 120) -> None:
    """Wait for a whole run: the server, then each (client, its log), to exit 0; every
    process is stopped whatever happens."""
    try:
        expect_exit(server, server_log, timeout=timeout)
        for proc, log in clients:
            expect_exit(proc, log, timeout=30)
    finally:
        stop(server, *(proc for proc, _ in clients))


def refused_counts(text: str) -> dict[str, int]:
    """The server's refusal lines ("refused N connection(s): n1 why1; n2 why2") added up by reason."""
    counts: dict[str, int] = {}
    for detail in re.findall(r"refused \d+ connection\(s\): (.*)", text):
        for part in detail.split("; "):
            n, why = part.split(" ", 1)
            counts[why] = counts.get(why, 0) + int(n)
    return counts
