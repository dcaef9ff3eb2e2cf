"""Secure aggregation against plain rounds: added wall time and bytes per round, and accuracy.

Runs the real launcher (server.py + worker.py virtual clients) with the same seed, once
plain and once with ``--secure-aggregation`` (and, with ``--neighbours K``, once with SecAgg+
groups of K):

1. cost, for each ``--clients`` count: a few rounds on ``--cost-limit`` samples per client,
   so that training is short and the same in both runs; per round the server's own
   ``round_s`` (broadcast to the aggregate) and its socket byte counters (``bytes_up`` +
   ``bytes_down``, headers and tags included), averaged over the rounds after the first;
2. accuracy: ``--accuracy-clients`` clients, ``--accuracy-rounds`` rounds on
   ``--accuracy-limit`` samples each, evaluated on the whole test set: the final accuracy of
   both runs and their difference.

    python bench/secagg.py --clients 10 50 --neighbours 9
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, run_simulation  # noqa: E402


def per_round(metrics: list[dict]) -> dict[str, float]:
    later = metrics[1:] or metrics  # the first round also pays for imports and warm-up
    return {"round_s": statistics.mean(m["round_s"] for m in later),
            "bytes": statistics.mean(m["bytes_up"] + m["bytes_down"] for m in later),
            "bytes_up": statistics.mean(m["bytes_up"] for m in later),
            "train_s_max": statistics.mean(m["train_s_max"] or 0.0 for m in later)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    p.add_argument("--neighbours", type=int, default=None, help="also run SecAgg+ with groups of K (odd)")
    p.add_argument("--cost-rounds", type=int, default=3)
    p.add_argument("--cost-limit", type=int, default=50, help="samples per client in the cost runs")
    p.add_argument("--accuracy-clients", type=int, default=10)
    p.add_argument("--accuracy-rounds", type=int, default=5)
    p.add_argument("--accuracy-limit", type=int, default=1000, help="samples per client in the accuracy runs")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    variants = [("plain", []), ("secagg", ["--secure-aggregation"])]
    if a.neighbours:
        variants.append((f"secagg+{a.neighbours}", ["--secure-aggregation", "--secagg-neighbours", str(a.neighbours)]))
    out: dict = {"cost": {}, "runs": {}}
    for n in a.clients:
        common = ["--clients", str(n), "--rounds", str(a.cost_rounds), "--limit", str(a.cost_limit),
                  "--test-limit", "500", "--data-dir", a.data_dir, "--seed", str(a.seed)]
        rows = {}
        for name, flags in variants:
            if name.startswith("secagg+") and a.neighbours >= n:
                continue
            r = run_simulation(common + flags)
            rows[name] = per_round(r["metrics"])
            out["runs"][f"{name}-{n}"] = r["out"]
            print(f"{n:>3} clients {name:>10}: round {rows[name]['round_s']:.2f} s (slowest client trains "
                  f"{rows[name]['train_s_max']:.2f} s), {rows[name]['bytes'] / 1e6:.2f} MB/round "
                  f"({rows[name]['bytes_up'] / 1e6:.2f} up) | {r['wall_s']:.0f} s wall", flush=True)
        plain = rows["plain"]
        for name, row in rows.items():
            if name == "plain":
                continue
            row["added_s"] = row["round_s"] - plain["round_s"]
            row["time_ratio"] = row["round_s"] / plain["round_s"]
            row["added_bytes"] = row["bytes"] - plain["bytes"]
            row["bytes_ratio"] = row["bytes"] / plain["bytes"]
            print(f"{n:>3} clients {name:>10}: +{row['added_s']:.2f} s per round ({row['time_ratio']:.2f}x), "
                  f"+{row['added_bytes'] / 1e3:.0f} kB per round ({row['bytes_ratio']:.4f}x)", flush=True)
        out["cost"][n] = rows
    if not a.skip_accuracy:
        common = ["--clients", str(a.accuracy_clients), "--rounds", str(a.accuracy_rounds), "--limit",
                  str(a.accuracy_limit), "--data-dir", a.data_dir, "--seed", str(a.seed)]
        acc = {}
        for name, flags in variants[:2]:
            r = run_simulation(common + flags)
            acc[name] = [m["accuracy"] for m in r["metrics"]]
            out["runs"][f"{name}-accuracy"] = r["out"]
            print(f"accuracy {name:>7}: {' '.join(f'{100 * x:.2f}' for x in acc[name])} | {r['wall_s']:.0f} s wall",
                  flush=True)
        diff = 100 * (acc["secagg"][-1] - acc["plain"][-1])
        print(f"final accuracy after {a.accuracy_rounds} rounds: plain {100 * acc['plain'][-1]:.2f}%, "
              f"secure aggregation {100 * acc['secagg'][-1]:.2f}% ({diff:+.2f} pp)")
        out["accuracy"] = {"plain": acc["plain"], "secagg": acc["secagg"], "diff_pp": diff,
                           "clients": a.accuracy_clients, "rounds": a.accuracy_rounds, "limit": a.accuracy_limit}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
