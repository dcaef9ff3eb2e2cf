"""Shared by the federation benchmarks: run the real launcher, watch its processes' memory."""
from __future__ import annotations

import json
import os
import re
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


def smaps(pid: int) -> dict[str, float]:
    """RSS and PSS (shared pages, such as torch's libraries, split among the processes that
    map them) of one process, MB, from /proc/<pid>/smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {"rss": 0.0, "pss": 0.0}
    kb = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}
    return {"rss": kb.get("Rss", 0) / 1024, "pss": kb.get("Pss", 0) / 1024}


def tree(pid: int) -> dict[str, float]:
    """RSS and PSS summed over ``pid`` and all its descendants, and how many processes."""
    total = {"rss": 0.0, "pss": 0.0, "processes": 0}
    for p in [pid, *descendants(pid)]:
        m = smaps(p)
        total["rss"] += m["rss"]
        total["pss"] += m["pss"]
        total["processes"] += 1
    return total


def run_simulation(sim_args: list[str], quiet: bool = True) -> dict:
    """Run ``simulate.py`` with ``sim_args``; return its metrics, wall time and peak memory
    of all its processes together (RSS and PSS summed over the tree, sampled every 0.2 s),
    and ``started``: the wall-clock time of the launch, the origin of a metrics line's ``time``."""
    out = Path(tempfile.mkdtemp(prefix="flbench-"))
    cmd = [sys.executable, str(REPO / "simulate.py"), "--out", str(out), "--no-plot", *sim_args]
    started = time.time()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL if quiet else None,
                            stderr=subprocess.DEVNULL if quiet else None)
    peak = {"rss": 0.0, "pss": 0.0}

    def sample() -> None:
        while proc.poll() is None:
            now = tree(proc.pid)
            peak["rss"], peak["pss"] = max(peak["rss"], now["rss"]), max(peak["pss"], now["pss"])
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    code = proc.wait()
    t.join()
    wall = time.monotonic() - start
    if code != 0:
        raise SystemExit(f"simulate.py {' '.join(sim_args)} failed with status {code}; logs in {out}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"metrics": metrics, "wall_s": wall, "peak_rss_mb": peak["rss"], "peak_pss_mb": peak["pss"],
            "out": str(out), "started": started}


def updates_of(record: dict) -> int:
    """Client updates one metrics line aggregated: ``clients`` is their count in a round, or
    the list of them in an asynchronous server step."""
    clients = record["clients"]
    return clients if isinstance(clients, int) else len(clients)
