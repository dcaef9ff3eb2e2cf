"""Straggling clients: synchronous FedAvg against buffered asynchronous aggregation (FedBuff).

100 virtual clients whose local training is slowed by a lognormal factor (``simulate.py
--client-speeds lognormal:SIGMA:MEDIAN``, seeded: the same clients are slow in both modes; a
slow client sleeps factor-1 times its training time after training). MEDIAN 5 says the
median device is 5x slower than a core here: ten clients in flight then want about one of
this machine's two cores, where MEDIAN 1 would time the queue for the cores, not the schedule.
For each partition (IID, Dirichlet(--alpha)), the same federation runs twice with the same
client training settings (--lr, --local-epochs, --batch-size, --limit, seed):

- sync: ``--fraction 0.1`` (10 clients a round; a round waits for its slowest client);
- async: ``--mode async --concurrency 10 --buffer-size 10`` (a server step every 10 updates).

``--rounds`` counts rounds and server steps alike, so both runs fold in the same number of
client updates. ``--seeds`` repeats the pair for each seed (a seed draws the speeds, the
partition, the sampling and the training): time to 98% crosses a threshold on a curve that
is flat there, so one pair can land a whole round either side; the comparison is reported
per seed and as the median of the per-seed ratios. Reported per run: wall time (from the
launch, so both include the start-up) and client updates to 97% and 98% test accuracy, the final accuracy, and the peak RSS and
PSS of the whole process tree; the curves against wall time go to ``--plot``.

    python bench/async.py                                   # the issue's setting
    python bench/async.py --rounds 3 --limit 100 --test-limit 500 --partitions iid   # a quick look
    python bench/async.py --modes sync                      # one half only
    python bench/async.py --partitions iid --seeds 0 1 2    # three pairs, the median ratio

The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, run_simulation, updates_of  # noqa: E402

TARGETS = (0.97, 0.98)


def mode_flags(mode: str, a: argparse.Namespace) -> list[str]:
    """What differs between the two runs: how the server schedules clients, nothing else."""
    if mode == "sync":
        return ["--fraction", str(a.concurrency / a.clients)]
    return ["--mode", "async", "--concurrency", str(a.concurrency), "--buffer-size", str(a.buffer_size)]


def common_flags(a: argparse.Namespace, partition: str, seed: int) -> list[str]:
    """The federation and the client training settings both runs share."""
    flags = ["--clients", str(a.clients), "--rounds", str(a.rounds), "--partition", partition,
             "--alpha", str(a.alpha), "--client-speeds", f"lognormal:{a.sigma}:{a.median}", "--seed", str(seed),
             "--local-epochs", str(a.local_epochs), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
             "--test-limit", str(a.test_limit), "--workers", str(a.workers), "--data-dir", a.data_dir,
             "--no-tensorboard"]
    return flags + (["--limit", str(a.limit)] if a.limit else []) + a.extra


def curve(run: dict) -> list[dict]:
    """Per metrics line: seconds since the launch, client updates so far, test accuracy."""
    points, updates = [], 0
    for m in run["metrics"]:
        updates += updates_of(m)
        # "published": when the step's model existed (the evaluator may write its line later)
        points.append({"s": (m.get("published") or m["time"]) - run["started"], "updates": updates,
                       "accuracy": m["accuracy"]})
    return points


def reached(points: list[dict], target: float) -> dict | None:
    """Seconds and client updates when test accuracy first reached ``target``."""
    first = next((p for p in points if p["accuracy"] >= target), None)
    return None if first is None else {"s": round(first["s"], 1), "updates": first["updates"]}


def accuracy_after(points: list[dict], updates: int) -> float | None:
    """Test accuracy of the last model built from at most ``updates`` client updates."""
    before = [p for p in points if p["updates"] <= updates]
    return before[-1]["accuracy"] if before else None


def measure(mode: str, partition: str, seed: int, a: argparse.Namespace) -> dict:
    run = run_simulation(common_flags(a, partition, seed) + mode_flags(mode, a))
    points = curve(run)
    out = {"mode": mode, "partition": partition, "seed": seed, "curve": points, "wall_s": round(run["wall_s"], 1),
           "updates": points[-1]["updates"] if points else 0, "final_accuracy": points[-1]["accuracy"] if points else None,
           "peak_rss_mb": round(run["peak_rss_mb"]), "peak_pss_mb": round(run["peak_pss_mb"]), "run": run["out"]}
    out.update({f"to_{round(100 * t)}": reached(points, t) for t in TARGETS})
    print(f"{partition} seed {seed} {mode}: final {100 * (out['final_accuracy'] or 0):.2f}% after {out['updates']} updates, "
          + ", ".join(f"{round(100 * t)}%: " + (f"{r['s']:.0f} s / {r['updates']} updates" if (r := out[f'to_{round(100 * t)}'])
                      else "not reached") for t in TARGETS)
          + f"; {out['wall_s']:.0f} s wall, peak RSS {out['peak_rss_mb']} MB, PSS {out['peak_pss_mb']} MB", flush=True)
    return out


def compare(sync: dict, asyn: dict) -> dict:
    """The issue's two questions: wall time to 98% (async over sync), and accuracy after the
    same number of client updates (async minus sync, percentage points)."""
    same = min(sync["updates"], asyn["updates"])
    a_acc, s_acc = accuracy_after(asyn["curve"], same), accuracy_after(sync["curve"], same)
    out = {"updates_compared": same, "accuracy_diff_pp": None if None in (a_acc, s_acc) else round(100 * (a_acc - s_acc), 2)}
    for t in TARGETS:
        key = f"to_{round(100 * t)}"
        s, x = sync[key], asyn[key]
        out[f"time_ratio_{key}"] = round(x["s"] / s["s"], 3) if s and x else None
    return out


def summarise(comparisons: list[dict]) -> dict:
    """The median over seeds of each figure; None where a seed has none (a target one mode
    did not reach: that seed's line says which)."""
    out = {}
    for key in comparisons[0]:
        values = [c[key] for c in comparisons]
        out[key] = None if None in values else round(statistics.median(values), 3)
    return out


def plot(results: list[dict], path: str) -> None:
    """Test accuracy against wall time, one panel per partition, sync and async overlaid
    (one line per seed, one colour per mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = list(dict.fromkeys(r["partition"] for r in results))
    fig, axes = plt.subplots(1, len(partitions), figsize=(6 * len(partitions), 4.2), squeeze=False)
    for ax, partition in zip(axes[0], partitions):
        runs = [r for r in results if r["partition"] == partition]
        seeds = list(dict.fromkeys(r["seed"] for r in runs))
        for r in runs:
            label = r["mode"] + (f" seed {r['seed']}" if len(seeds) > 1 else "") + f" ({r['updates']} updates, {r['wall_s']:.0f} s)"
            ax.plot([p["s"] for p in r["curve"]], [100 * p["accuracy"] for p in r["curve"]], marker=".", label=label,
                    color="C0" if r["mode"] == "sync" else "C1", ls=("-", "--", ":", "-.")[seeds.index(r["seed"]) % 4])
        for t in TARGETS:
            ax.axhline(100 * t, color="grey", lw=0.6, ls=":")
        ax.set(title=partition, xlabel="wall time since launch (s)", ylabel="test accuracy (%)")
        if any(p["accuracy"] >= 0.95 for r in results for p in r["curve"]):
            ax.set_ylim(90, 100)  # where the targets are
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--partitions", nargs="+", choices=("iid", "dirichlet"), default=["iid", "dirichlet"])
    p.add_argument("--modes", nargs="+", choices=("sync", "async"), default=["sync", "async"])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=10, help="sync: clients a round; async: --concurrency")
    p.add_argument("--buffer-size", type=int, default=10)
    p.add_argument("--sigma", type=float, default=1.0, help="--client-speeds lognormal:SIGMA:MEDIAN")
    p.add_argument("--median", type=float, default=5.0,
                   help="the median slowdown: devices 5x slower than a core here, so ten clients training at "
                        "once want about one of this machine's 2 cores (1: half the clients at this machine's speed)")
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration")
    p.add_argument("--rounds", type=int, default=7, help="sync rounds = async server steps")
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, default=None, help="samples per client (default: its whole shard)")
    p.add_argument("--test-limit", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one sync/async pair per seed")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--plot", default="docs/async.png", help="the curves ('' for none)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more simulate.py flags, both modes")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    start = time.monotonic()
    results = [measure(mode, partition, seed, a) for partition in a.partitions for seed in a.seeds for mode in a.modes]
    comparisons = {}
    for partition in a.partitions:
        per_seed = {}
        for seed in a.seeds:
            both = {r["mode"]: r for r in results if r["partition"] == partition and r["seed"] == seed}
            if len(both) == 2:
                c = per_seed[seed] = compare(both["sync"], both["async"])
                print(f"{partition} seed {seed}: async/sync wall time to 97% {c['time_ratio_to_97']}, to 98% "
                      f"{c['time_ratio_to_98']}; accuracy after {c['updates_compared']} updates async - sync "
                      f"{c['accuracy_diff_pp']} pp", flush=True)
        if per_seed:
            comparisons[partition] = {"per_seed": per_seed, "median": summarise(list(per_seed.values()))}
            if len(per_seed) > 1:
                print(f"{partition}: median over {len(per_seed)} seeds {comparisons[partition]['median']}", flush=True)
    if a.plot:
        plot(results, a.plot)
    summary = [{k: v for k, v in r.items() if k != "curve"} | {"accuracy": [p["accuracy"] for p in r["curve"]]}
               for r in results]
    print(json.dumps({"clients": a.clients, "sigma": a.sigma, "median": a.median, "rounds": a.rounds, "wall_s": round(time.monotonic() - start),
                      "runs": summary, "comparison": comparisons}))


if __name__ == "__main__":
    main()
