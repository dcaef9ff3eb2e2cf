"""Hundreds of clients on one machine: memory, round overhead, and the FedAvg paper's MNIST run.

``memory``: ``simulate.py --clients N --fraction F --rounds 3`` for (100, 0.1) and
(1000, 0.01): the peak of RSS and of PSS summed over the launcher's whole process tree
(launcher, server, workers; sampled every 0.2 s from /proc/<pid>/smaps_rollup; PSS splits
the pages processes share, such as torch's libraries, so it is the machine's real cost),
and the round overhead: round wall time over (summed local training time of the sampled
clients / workers).

``paper``: McMahan et al. 2017's MNIST CNN setting with this model: 100 clients, C = 0.1,
E = 5, B = 10, IID or pathological non-IID (--partition shards), until --target accuracy
or --rounds (the server stops one round after the target is met, ``--target-accuracy``):
the round that first reaches it, beside the paper's Table 2 (CNN, E=5, B=10:
20 rounds IID, 229 non-IID, to 99%).

    python bench/scale.py memory
    python bench/scale.py paper --partition iid --rounds 20
    python bench/scale.py paper --partition shards --rounds 200 --extra --client-optimizer sgd --lr 0.05 --freeze-bn-after 30
    python bench/scale.py paper --partition iid --rounds 20 --target 0.975 --extra --engine ray   # overhead, engines

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
from common import DEFAULT_DATA, run_simulation  # noqa: E402

PAPER_ROUNDS_TO_99 = {"iid": 20, "shards": 229}  # McMahan et al. 2017, Table 2, CNN, E=5, B=10


def overheads(ms: list[dict], workers: int) -> list[float]:
    """Per round: wall time over the sampled clients' summed training time / workers."""
    return [m["round_s"] / (m["train_s_sum"] / workers) for m in ms if m.get("train_s_sum")]


def memory(a: argparse.Namespace) -> dict:
    out = {}
    for clients, fraction in ((100, 0.1), (1000, 0.01)):
        r = run_simulation(["--clients", str(clients), "--fraction", str(fraction), "--rounds", "3",
                            "--workers", str(a.workers), "--test-limit", str(a.test_limit), "--seed", str(a.seed),
                            "--data-dir", a.data_dir])
        ms = r["metrics"]
        ratio = overheads(ms, a.workers)
        out[str(clients)] = {"fraction": fraction, "peak_rss_mb": r["peak_rss_mb"], "peak_pss_mb": r["peak_pss_mb"],
                             "server_peak_rss_mb": max(m["server_peak_rss_mb"] for m in ms),
                             "overhead": ratio, "sampled": [len(m["sampled"]) for m in ms],
                             "round_s": [m["round_s"] for m in ms], "accuracy": [m["accuracy"] for m in ms],
                             "wall_s": r["wall_s"]}
        print(f"{clients} clients, fraction {fraction}: peak RSS {r['peak_rss_mb']:.0f} MB, PSS "
              f"{r['peak_pss_mb']:.0f} MB; overhead per round {', '.join(f'{x:.3f}' for x in ratio)}; "
              "round_s " + ", ".join(f"{m['round_s']:.1f}" for m in ms), flush=True)
    return out


def paper(a: argparse.Namespace) -> dict:
    r = run_simulation(["--clients", "100", "--fraction", "0.1", "--local-epochs", "5", "--batch-size", "10",
                        "--partition", a.partition, "--rounds", str(a.rounds), "--workers", str(a.workers),
                        "--test-limit", str(a.test_limit), "--seed", str(a.seed), "--data-dir", a.data_dir,
                        "--target-accuracy", str(a.target), *a.extra])
    ms = r["metrics"]
    reached = next((m["round"] for m in ms if m["accuracy"] >= a.target), None)
    ratio = overheads(ms, a.workers)
    print(f"{a.partition}: accuracy " + ", ".join(f"{100 * m['accuracy']:.2f}" for m in ms))
    print(f"{a.target:.0%} reached at round {reached} (paper: {PAPER_ROUNDS_TO_99[a.partition]}); "
          f"after {len(ms)} rounds {100 * ms[-1]['accuracy']:.2f}%, best {100 * max(m['accuracy'] for m in ms):.2f}%; "
          f"overhead median {statistics.median(ratio):.3f}", flush=True)
    return {"partition": a.partition, "accuracy": [m["accuracy"] for m in ms], "round_to_target": reached,
            "paper_rounds": PAPER_ROUNDS_TO_99[a.partition], "overhead_median": statistics.median(ratio),
            "round_s_median": statistics.median(m["round_s"] for m in ms), "peak_pss_mb": r["peak_pss_mb"],
            "wall_s": r["wall_s"], "run": r["out"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("memory", "paper"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--partition", choices=("iid", "shards"), default="iid")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more simulate.py flags")
    a = p.parse_args()
    if a.test_limit is None:
        a.test_limit = 10_000 if a.mode == "paper" else 1000
    start = time.monotonic()
    result = memory(a) if a.mode == "memory" else paper(a)
    print(json.dumps({"mode": a.mode, "wall_s": time.monotonic() - start, **result}))


if __name__ == "__main__":
    main()
