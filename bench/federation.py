"""Round overhead, time to accuracy and scale of a whole local federation.

Runs the real launcher (server + N client processes on 127.0.0.1) and reads the server's
metrics: per round the wall time (broadcast to last update folded in) against the
slowest client's own training time, test accuracy, and the round and wall seconds at
which accuracy first reaches ``--target``; plus the peak memory of all processes together.

    python bench/federation.py --clients 3 --rounds 5           # targets 2 and 4
    python bench/federation.py --clients 10 --rounds 3          # target 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, run_simulation  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--target", type=float, default=0.99, help="accuracy to reach")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more simulate.py flags")
    a = p.parse_args()
    r = run_simulation(["--clients", str(a.clients), "--rounds", str(a.rounds), "--data-dir", a.data_dir, *a.extra])
    ms = r["metrics"]
    elapsed = 0.0
    reached = None
    print("round  accuracy  loss    round_s  slowest_train_s  overhead")
    for m in ms:
        elapsed = m["time"] - ms[0]["time"] + ms[0]["round_s"]
        print(f"{m['round']:>5}  {m['accuracy']:.4f}    {m['loss']:.4f}  {m['round_s']:7.1f}  "
              f"{m['train_s_max']:15.1f}  {m['overhead']:.3f}")
        if reached is None and m["accuracy"] >= a.target:
            reached = (m["round"], elapsed)
    later = [m["overhead"] for m in ms[1:]] or [ms[0]["overhead"]]
    print(f"overhead (round_s / slowest client's train_s), mean of rounds 2..{len(ms)}: {statistics.mean(later):.3f}")
    print(f"accuracy >= {a.target:.3f}: " + (f"round {reached[0]}, {reached[1]:.0f} s after the first broadcast"
                                              if reached else "not reached"))
    print(f"wall {r['wall_s']:.0f} s (processes started to all exited); peak memory of all processes "
          f"{r['peak_rss_mb']:.0f} MB")
    print(json.dumps({"clients": a.clients, "rounds": a.rounds, "accuracy": [m["accuracy"] for m in ms],
                      "round_s": [m["round_s"] for m in ms], "overhead": [m["overhead"] for m in ms],
                      "overhead_mean_after_round1": statistics.mean(later),
                      "round_to_target": reached[0] if reached else None,
                      "seconds_to_target": reached[1] if reached else None,
                      "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "run": r["out"]}))


if __name__ == "__main__":
    main()
