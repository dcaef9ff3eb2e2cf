"""DP-FedAvg's cost in accuracy, and the privacy it buys, per round.

100 clients (IID shards of 600), --fraction 0.1, the same seed, once per noise multiplier
z (0 = clipping only): accuracy and epsilon (at delta = 1/N^1.1) per round, side by side,
and the best accuracy reached while epsilon <= 8 and <= 2.

    python bench/privacy.py --rounds 30 --clip-norm 1.0 --noise 0 0.5 1.0

Each run is the real launcher (server + 2 worker processes on 127.0.0.1); epsilon comes
from the server's metrics (dp-accounting's RDP accountant, at the m of n each round
realised). Under DP the metrics hold no per-client record, so no update norm is reported.
Writes --json and --plot; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, run_simulation  # noqa: E402


def best_within(ms: list[dict], budget: float) -> tuple[float | None, int | None]:
    inside = [m for m in ms if m.get("epsilon", 0.0) <= budget]
    if not inside:
        return None, None
    best = max(inside, key=lambda m: m["accuracy"])
    return best["accuracy"], best["round"]


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (acc, eps) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(rows):  # one colour per z in both panels
        rounds = range(1, len(r["accuracy"]) + 1)
        acc.plot(rounds, [100 * a for a in r["accuracy"]], color=f"C{i}", label=f"z = {r['z']:g}")
        if r["z"] > 0:
            eps.plot(rounds, r["epsilon"], color=f"C{i}", label=f"z = {r['z']:g}")
    acc.set_xlabel("round"), acc.set_ylabel("test accuracy (%)"), acc.grid(alpha=0.3), acc.legend()
    eps.set_xlabel("round"), eps.set_ylabel(f"epsilon (delta = {rows[0]['delta']:.2g})"), eps.grid(alpha=0.3)
    eps.set_yscale("log"), eps.legend()
    for budget in (2, 8):
        eps.axhline(budget, color="grey", lw=0.8, ls="--")
    fig.suptitle(f"DP-FedAvg, 100 clients, 10 sampled per round, clip norm {rows[0]['clip']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more simulate.py flags")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args()
    start = time.monotonic()
    rows = []
    for z in a.noise:
        r = run_simulation(["--clients", str(a.clients), "--fraction", str(a.fraction), "--rounds", str(a.rounds),
                            "--workers", "2", "--test-limit", str(a.test_limit), "--seed", str(a.seed),
                            "--data-dir", a.data_dir, "--lr-schedule", "constant",
                            "--dp-noise-multiplier", str(z), "--clip-norm", str(a.clip_norm), "--dp-seed", "0",
                            *a.extra])
        ms = r["metrics"]
        row = {"z": z, "clip": a.clip_norm, "accuracy": [m["accuracy"] for m in ms],
               "epsilon": [m["epsilon"] for m in ms], "delta": ms[0]["delta"],
               "round_s_median": sorted(m["round_s"] for m in ms)[len(ms) // 2]}
        for budget in (8, 2):
            row[f"best_at_eps_{budget}"], row[f"round_at_eps_{budget}"] = best_within(ms, budget)
        rows.append(row)
        print(f"z={z:<4g} final {row['accuracy'][-1]:.4f} best {max(row['accuracy']):.4f} "
              f"epsilon after {len(ms)} rounds {row['epsilon'][-1]:.3g}; best at eps<=8: {row['best_at_eps_8']}, "
              f"at eps<=2: {row['best_at_eps_2']}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.plot:
        plot(rows, a.plot)
    print(json.dumps({"rounds": a.rounds, "clip_norm": a.clip_norm, "wall_s": time.monotonic() - start,
                      "runs": rows}))


if __name__ == "__main__":
    main()
