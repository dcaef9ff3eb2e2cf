"""Shared by the federation benchmarks: run the real launcher, watch its processes' memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (the launcher's server and clients)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_simulation(sim_args: list[str], quiet: bool = True) -> dict:
    """Run ``simulate.py`` with ``sim_args``; return its metrics, wall time and peak memory
    of all its processes together (sampled every 0.2 s)."""
    out = Path(tempfile.mkdtemp(prefix="flbench-"))
    cmd = [sys.executable, str(REPO / "simulate.py"), "--out", str(out), "--no-plot", *sim_args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL if quiet else None,
                            stderr=subprocess.DEVNULL if quiet else None)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            total = rss_mb(proc.pid) + sum(rss_mb(p) for p in descendants(proc.pid))
            peak[0] = max(peak[0], total)
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    code = proc.wait()
    t.join()
    wall = time.monotonic() - start
    if code != 0:
        raise SystemExit(f"simulate.py {' '.join(sim_args)} failed with status {code}; logs in {out}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"metrics": metrics, "wall_s": wall, "peak_rss_mb": peak[0], "out": str(out)}
