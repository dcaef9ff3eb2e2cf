"""Strategies on skewed shards, and robust aggregation against a poisoning participant.

``skew`` (default): 10 clients, --fraction 0.5, R rounds, on Dirichlet(0.1) shards and on
the FedAvg paper's pathological split (two digits per client), once per strategy with the
parameters listed in STRATEGIES: accuracy per round, wall time per round, server peak RSS.

``attack``: 9 honest clients and one that sends -50 x its honest delta every round
(``bench/attacker.py``), all sampled every round, IID shards: fedavg without the default
norm screen (--norm-ratio 0), fedavg with it, median, trimmed-mean and fedavg with
--clip-norm at the honest run's median update norm, against the honest fedavg run.

    python bench/strategies.py skew --rounds 20 --limit 1000
    python bench/strategies.py attack --rounds 8 --limit 1000

Each run is the real launcher (server + worker processes on 127.0.0.1). Prints a table,
writes ``--json`` (all figures) and ``--plot`` (accuracy per round), and one final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, run_simulation  # noqa: E402

STRATEGIES: dict[str, list[str]] = {
    "fedavg": ["--strategy", "fedavg"],
    "fedavgm": ["--strategy", "fedavgm", "--server-lr", "1.0", "--server-momentum", "0.5"],
    "fedadam": ["--strategy", "fedadam", "--server-lr", "0.01", "--tau", "0.001"],
    "fedyogi": ["--strategy", "fedyogi", "--server-lr", "0.01", "--tau", "0.001"],
    "fedadagrad": ["--strategy", "fedadagrad", "--server-lr", "0.01", "--tau", "0.001"],
    "fedprox": ["--strategy", "fedprox", "--mu", "0.01"],
    "median": ["--strategy", "median"],
    "trimmed-mean": ["--strategy", "trimmed-mean", "--trim-fraction", "0.2"],
}
PARTITIONS = {"dirichlet-0.1": ["--partition", "dirichlet", "--alpha", "0.1"], "shards": ["--partition", "shards"]}


def common_args(a: argparse.Namespace) -> list[str]:
    return ["--rounds", str(a.rounds), "--limit", str(a.limit), "--test-limit", str(a.test_limit),
            "--seed", str(a.seed), "--data-dir", a.data_dir, "--workers", "2"]


def summarise(name: str, r: dict) -> dict:
    ms = r["metrics"]
    return {"run": name, "accuracy": [m["accuracy"] for m in ms], "round_s": [m["round_s"] for m in ms],
            "final": ms[-1]["accuracy"], "best": max(m["accuracy"] for m in ms),
            "round_s_median": statistics.median(m["round_s"] for m in ms),
            "server_peak_rss_mb": max(m.get("server_peak_rss_mb", 0) for m in ms),
            "tree_peak_rss_mb": r["peak_rss_mb"], "rejected": sum(len(m.get("rejected", [])) for m in ms),
            "sampled": [m.get("sampled") for m in ms]}


def skew(a: argparse.Namespace) -> list[dict]:
    rows = []
    for part, part_args in PARTITIONS.items():
        for name, strat_args in STRATEGIES.items():
            if a.only and name not in a.only:
                continue
            r = run_simulation(["--clients", "10", "--fraction", "0.5", *common_args(a), *part_args, *strat_args])
            rows.append({"partition": part, "strategy": " ".join(strat_args[1:]), **summarise(name, r)})
            print(f"{part:14} {name:13} final {rows[-1]['final']:.4f} best {rows[-1]['best']:.4f} "
                  f"round {rows[-1]['round_s_median']:.1f} s  server RSS {rows[-1]['server_peak_rss_mb']:.0f} MB",
                  flush=True)
    return rows


def attacked_run(a: argparse.Namespace, extra: list[str], scale: float) -> dict:
    """simulate.py with 9 honest clients (9-way shards) plus the attacker as client 9."""
    port = _free_port()
    secret = os.urandom(16).hex()
    env = dict(os.environ, FL_SECRET=secret, PYTHONUNBUFFERED="1")
    log = tempfile.NamedTemporaryFile(prefix="attacker-", suffix=".log", delete=False)
    attacker = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "attacker.py"), "--scale", str(scale), "--",
         "--client-ids", "9", "--num-clients", "10", "--port", str(port), "--limit", str(a.limit),
         "--seed", str(a.seed), "--data-dir", a.data_dir, "--no-progress"], env=env, stdout=log, stderr=log)
    try:
        return run_simulation(["--clients", "9", "--port", str(port), "--secret", secret, *common_args(a),
                               *extra, "--min-clients", "10", "--max-samples", str(a.limit)])
    finally:
        if attacker.poll() is None:
            attacker.send_signal(signal.SIGTERM)
            attacker.wait()


def attack(a: argparse.Namespace) -> list[dict]:
    honest = run_simulation(["--clients", "9", *common_args(a)])
    norms = [c["norm"] for m in honest["metrics"] for c in m["per_client"]]
    clip = statistics.median(norms)
    print(f"honest fedavg: final {honest['metrics'][-1]['accuracy']:.4f}; median update norm {clip:.3f} "
          f"(the --clip-norm below)", flush=True)
    rows = [{"defence": "none (honest run)", **summarise("honest", honest)}]
    runs = {
        "fedavg, no screen (--norm-ratio 0)": ["--strategy", "fedavg", "--norm-ratio", "0"],
        "fedavg, default norm screen": ["--strategy", "fedavg"],
        "median, no screen": ["--strategy", "median", "--norm-ratio", "0"],
        "trimmed-mean 0.1, no screen": ["--strategy", "trimmed-mean", "--trim-fraction", "0.1", "--norm-ratio", "0"],
        f"fedavg --clip-norm {clip:.2f}, no screen": ["--strategy", "fedavg", "--clip-norm", f"{clip:.4f}",
                                                      "--norm-ratio", "0"],
    }
    for defence, extra in runs.items():
        r = attacked_run(a, extra, a.scale)
        rows.append({"defence": defence, **summarise(defence, r)})
        print(f"{defence:40} final {rows[-1]['final']:.4f} ({100 * (rows[-1]['final'] - rows[0]['final']):+.2f} pp) "
              f"rejected {rows[-1]['rejected']}", flush=True)
    return rows


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(rows: list[dict], path: str, key: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({r.get("partition", "") for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for r in rows:
            if r.get("partition", "") == group:
                ax.plot(range(1, len(r["accuracy"]) + 1), [100 * x for x in r["accuracy"]], label=r[key])
        ax.set_title(group or "attack")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("skew", "attack"), nargs="?", default="skew")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--limit", type=int, default=1000, help="samples per client (a seeded random subset)")
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=-50.0, help="attack: factor on the attacker's delta")
    p.add_argument("--only", nargs="*", default=None, help="skew: only these strategies")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--json", default=None, help="write all figures here")
    p.add_argument("--plot", default=None, help="write the accuracy curves here (PNG)")
    a = p.parse_args()
    start = time.monotonic()
    rows = skew(a) if a.mode == "skew" else attack(a)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.plot:
        plot(rows, a.plot, "run" if a.mode == "skew" else "defence")
    print(json.dumps({"mode": a.mode, "rounds": a.rounds, "limit": a.limit, "wall_s": time.monotonic() - start,
                      "runs": [{k: r[k] for k in r if k not in ("sampled", "round_s")} for r in rows]}))


if __name__ == "__main__":
    main()
