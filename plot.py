"""Learning curves from the server's metrics file: test accuracy and loss per round.

Several runs (e.g. float vs 8-bit updates) can be overlaid to compare them at a glance.

    python -m plot metrics.jsonl -o curve.png
    python -m plot float/metrics.jsonl q8/metrics.jsonl --labels float 8-bit -o compare.png

matplotlib is an optional dependency: it is imported only when a plot is drawn.
"""
from __future__ import annotations

import argparse
import sys
from numbers import Real
from pathlib import Path
from typing import Any

from fl.common.cli import HelpFormatter
from fl.server.checkpoint import read_metrics

MPL_HINT = "plotting needs matplotlib: pip install matplotlib"


def default_label(path: str | Path) -> str:
    """Runs usually live in their own folder with the same file name, so the folder tells them apart."""
    path = Path(path)
    parent = path.resolve().parent.name
    return f"{parent}/{path.stem}" if parent else path.stem


def load_run(path: str | Path) -> list[dict[str, Any]]:
    """The records of one metrics file sorted by round; ValueError (one line) if unusable."""
    try:
        records = read_metrics(path)
    except FileNotFoundError:
        raise ValueError(f"metrics file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read metrics file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not a JSON Lines metrics file ({type(exc).__name__})") from None
    if not records:
        raise ValueError(f"{path} holds no rounds yet")
    for i, r in enumerate(records, 1):
        if not (isinstance(r, dict) and all(isinstance(r.get(k), Real) and not isinstance(r.get(k), bool)
                                            for k in ("round", "accuracy", "loss"))):
            raise ValueError(f"{path}: record {i} lacks numeric round/accuracy/loss")
    return sorted(records, key=lambda r: r["round"])


def plot_metrics(runs: list[tuple[str, list[dict[str, Any]]]], out: Path, title: str | None = None) -> Path:
    """Write a PNG of accuracy (%) and loss per round, one line per (label, records) run,
    and a third panel of epsilon per round when a run was differentially private.

    Raises ImportError with :data:`MPL_HINT` if matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError(MPL_HINT) from None
    # A bare Figure (no pyplot) keeps no global state, so the launcher may call this from any thread.
    private = any("epsilon" in r for _, records in runs for r in records)
    fig = Figure(figsize=(16 if private else 11, 4.2), layout="constrained")
    axes = fig.subplots(1, 3 if private else 2)
    ax_acc, ax_loss = axes[0], axes[1]
    panels = [(ax_acc, "test accuracy (%)"), (ax_loss, "test loss")]
    for label, records in runs:
        rounds = [r["round"] for r in records]
        ax_acc.plot(rounds, [100 * r["accuracy"] for r in records], marker="o", markersize=3, label=label)
        ax_loss.plot(rounds, [r["loss"] for r in records], marker="o", markersize=3, label=label)
        if private and any("epsilon" in r for r in records):
            axes[2].plot([r["round"] for r in records if "epsilon" in r],
                         [r["epsilon"] for r in records if "epsilon" in r], marker="o", markersize=3, label=label)
    if private:
        delta = next(r["delta"] for _, records in runs for r in records if "delta" in r)
        panels.append((axes[2], f"epsilon (delta = {delta:.2g})"))
    for ax, name in panels:
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics JSON Lines file(s) written by server.py --metrics")
    p.add_argument("-o", "--output", default="curve.png", help="PNG file to write")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one legend label per metrics file (default: parent folder/file stem)")
    p.add_argument("--title", default=None, help="title above both panels")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.metrics):
        p.error(f"--labels got {len(args.labels)} label(s) for {len(args.metrics)} metrics file(s)")
    labels = args.labels or [default_label(m) for m in args.metrics]
    try:
        runs = [(label, load_run(m)) for label, m in zip(labels, args.metrics)]
        out = plot_metrics(runs, Path(args.output), args.title)
    except (ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
