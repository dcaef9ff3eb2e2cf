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
    p.add_argument("--stochastic", action="store_true", help="also run 8-bit with stochastic rounding")
    p.add_argument("--broadcast", action="store_true",
                   help="also run with --quantization --quantize-broadcast (8-bit both ways)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more simulate.py flags")
    a = p.parse_args()
    base = ["--clients", str(a.clients), "--rounds", str(a.rounds), "--data-dir", a.data_dir,
            "--seed", str(a.seed), *a.extra]
    runs = {}
    variants = [("float", []), ("quantized", ["--quantization"])]
    if a.stochastic:
        variants.append(("stochastic", ["--quantization", "--stochastic-rounding"]))
    if a.broadcast:
        variants.append(("both-ways", ["--quantization", "--quantize-broadcast"]))
    for name, flags in variants:
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
    extra = {}
    if a.stochastic:
        st = runs["stochastic"]["metrics"]
        extra["stochastic_accuracy"] = st[-1]["accuracy"]
        print(f"stochastic rounding: final accuracy {st[-1]['accuracy']:.4f} "
              f"({100 * (st[-1]['accuracy'] - f[-1]['accuracy']):+.2f} pp vs float)")
    if a.broadcast:
        b = runs["both-ways"]["metrics"]
        extra.update({"broadcast_bytes_down_ratio": [mb["bytes_down"] / mf["bytes_down"] for mf, mb in zip(f, b)],
                      "broadcast_accuracy": b[-1]["accuracy"],
                      "broadcast_accuracy_diff_pp": 100 * (b[-1]["accuracy"] - f[-1]["accuracy"])})
        print(f"8-bit both ways: bytes_down ratio per round "
              f"{', '.join(f'{r:.4f}' for r in extra['broadcast_bytes_down_ratio'])}, final accuracy "
              f"{b[-1]['accuracy']:.4f} ({extra['broadcast_accuracy_diff_pp']:+.2f} pp)")
    print(json.dumps({**extra, "runs": {k: v["out"] for k, v in runs.items()}, "clients": a.clients, "rounds": a.rounds, "byte_ratio_max": max(ratios),
                      "byte_ratios": ratios, "float_accuracy": f[-1]["accuracy"],
                      "quantized_accuracy": q[-1]["accuracy"], "accuracy_diff_pp": diff_pp,
                      "bytes_down_ratio": q[-1]["bytes_down"] / f[-1]["bytes_down"]}))


if __name__ == "__main__":
    main()
