"""Memory of virtual clients: what hundreds of simulated clients cost on one machine.

Three figures, each from ``/proc/<pid>/smaps_rollup`` (RSS, and PSS, which splits pages
shared between processes, such as torch's libraries, among them):

1. idle: one ``worker.py`` hosting N connected clients that wait for a round (the server
   waits for N+1), against one hosting a single client;
2. training: the same worker's peak while all N train one round (--limit samples each);
3. launcher: the peak of the whole process tree of ``simulate.py --clients N --workers W
   --rounds 1`` (launcher, server, workers), summed over its processes every 0.2 s.

    python bench/virtual_clients.py --clients 100 --workers 2 --limit 100 --test-limit 500
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, smaps, tree  # noqa: E402


class Peak(threading.Thread):
    """Samples ``measure()`` every 0.2 s while ``proc`` runs; keeps the largest values."""

    def __init__(self, proc: subprocess.Popen, measure) -> None:
        super().__init__(daemon=True)
        self.proc, self.measure, self.peak = proc, measure, {}
        self.start()

    def run(self) -> None:
        while self.proc.poll() is None:
            for k, v in self.measure().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server(port: int, min_clients: int, tmp: Path, data: str, test_limit: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "server.py"), "--port", str(port), "--rounds", "1", "--min-clients",
         str(min_clients), "--max-connections", str(min_clients + 32), "--data-dir", data, "--test-limit",
         str(test_limit), "--checkpoint", str(tmp / "c.pt"), "--metrics", str(tmp / "m.jsonl"), "--threads", "1",
         "--no-progress", "--no-download"], stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT)


def worker(port: int, ids: str, n: int, tmp: Path, data: str, limit: int, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "worker.py"), "--client-ids", ids, "--num-clients", str(n), "--port", str(port),
         "--data-dir", data, "--no-download", "--no-progress", "--limit", str(limit)],
        stdout=open(tmp / f"{name}.log", "w"), stderr=subprocess.STDOUT)


def wait_joined(tmp: Path, count: int, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while (tmp / "server.log").read_text().count(" joined from ") < count:
        if time.monotonic() > end:
            raise SystemExit(f"only {(tmp / 'server.log').read_text().count(' joined from ')} of {count} joined")
        time.sleep(0.2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--test-limit", type=int, default=500)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    a = p.parse_args()
    n, data = a.clients, a.data_dir
    result: dict[str, object] = {"clients": n}

    tmp = Path(tempfile.mkdtemp(prefix="flvc-idle-"))
    port = free_port()
    procs = [server(port, n + 2, tmp, data, a.test_limit), worker(port, f"0-{n - 1}", n + 1, tmp, data, a.limit, "many"),
             worker(port, str(n), n + 1, tmp, data, a.limit, "one")]
    try:
        wait_joined(tmp, n + 1)
        time.sleep(2)
        many, one = smaps(procs[1].pid), smaps(procs[2].pid)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    per_client_kb = (many["rss"] - one["rss"]) * 1024 / max(1, n - 1)
    print(f"idle worker, {n} clients: RSS {many['rss']:.0f} MB, PSS {many['pss']:.0f} MB; "
          f"1 client: RSS {one['rss']:.0f} MB; {per_client_kb:.0f} KB RSS per extra client")
    result["idle_worker"] = {"rss_mb": round(many["rss"]), "pss_mb": round(many["pss"]),
                             "one_client_rss_mb": round(one["rss"]), "per_client_kb": round(per_client_kb)}

    tmp = Path(tempfile.mkdtemp(prefix="flvc-train-"))
    port = free_port()
    srv = server(port, n, tmp, data, a.test_limit)
    w = worker(port, f"0-{n - 1}", n, tmp, data, a.limit, "worker")
    peak = Peak(w, lambda: smaps(w.pid))
    start = time.monotonic()
    codes = (w.wait(), srv.wait())
    peak.join()
    if codes != (0, 0):
        raise SystemExit(f"training run failed {codes}; logs in {tmp}")
    print(f"worker training {n} clients one round ({a.limit} samples each): peak RSS {peak.peak['rss']:.0f} MB, "
          f"PSS {peak.peak['pss']:.0f} MB ({time.monotonic() - start:.0f} s)")
    result["training_worker"] = {"peak_rss_mb": round(peak.peak["rss"]), "peak_pss_mb": round(peak.peak["pss"])}

    out = Path(tempfile.mkdtemp(prefix="flvc-sim-"))
    cmd = [sys.executable, str(REPO / "simulate.py"), "--clients", str(n), "--workers", str(a.workers), "--rounds", "1",
           "--limit", str(a.limit), "--test-limit", str(a.test_limit), "--data-dir", data, "--out", str(out),
           "--no-plot"]
    sim = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
    peak = Peak(sim, lambda: tree(sim.pid))
    start = time.monotonic()
    if sim.wait() != 0:
        raise SystemExit(f"simulate.py failed; logs in {out}")
    peak.join()
    wall = time.monotonic() - start
    print(f"simulate.py --clients {n} --workers {a.workers} --rounds 1: peak of the process tree "
          f"({peak.peak['processes']:.0f} processes) RSS {peak.peak['rss']:.0f} MB, PSS {peak.peak['pss']:.0f} MB; "
          f"{wall:.0f} s wall")
    result["launcher_tree"] = {"peak_rss_mb": round(peak.peak["rss"]), "peak_pss_mb": round(peak.peak["pss"]),
                               "processes": int(peak.peak["processes"]), "wall_s": round(wall)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
