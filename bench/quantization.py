"""Float vs 8-bit quantized updates: uplink bytes per round and final accuracy.

Runs the real launcher twice with the same seed (every client quantized, then none) and
prints the byte ratio (quantized bytes_up / float bytes_up, per round, from the server's
socket counters) and the accuracy difference after the last round.

    python bench/quantization.py --clients 3 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, run_simulation  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more simulate.py flags")
    a = p.parse_args()
    base = ["--clients", str(a.clients), "--rounds", str(a.rounds), "--data-dir", a.data_dir,
            "--seed", str(a.seed), *a.extra]
    runs = {}
    for name, flags in (("float", []), ("quantized", ["--quantization"])):
        r = run_simulation(base + flags)
        runs[name] = r
        accs = " ".join(f"{m['accuracy']:.4f}" for m in r["metrics"])
        print(f"{name:>9}: accuracy by round {accs} | bytes_up/round "
              f"{[m['bytes_up'] for m in r['metrics']]} | {r['wall_s']:.0f} s", flush=True)
    f, q = runs["float"]["metrics"], runs["quantized"]["metrics"]
    ratios = [mq["bytes_up"] / mf["bytes_up"] for mf, mq in zip(f, q)]
    diff_pp = 100 * (q[-1]["accuracy"] - f[-1]["accuracy"])
    print(f"bytes_up ratio per round (quantized/float): {', '.join(f'{r:.4f}' for r in ratios)}")
    print(f"final accuracy: float {f[-1]['accuracy']:.4f}, quantized {q[-1]['accuracy']:.4f} "
          f"({diff_pp:+.2f} pp)")
    print(json.dumps({"clients": a.clients, "rounds": a.rounds, "byte_ratio_max": max(ratios),
                      "byte_ratios": ratios, "float_accuracy": f[-1]["accuracy"],
                      "quantized_accuracy": q[-1]["accuracy"], "accuracy_diff_pp": diff_pp,
                      "bytes_down_ratio": q[-1]["bytes_down"] / f[-1]["bytes_down"]}))


if __name__ == "__main__":
    main()
