"""A participant that poisons: a worker whose clients send ``scale`` x their honest delta
(BatchNorm variances excepted: the server refuses negative ones before any defence here).

Bench-only (never imported by the project): it appends a step to the chain that builds a
participant's update (``fl/client/steps``), then runs ``worker.py`` with the remaining
arguments, so the attacker speaks the real protocol, authenticates, and is sampled like
anyone else.

    python bench/attacker.py --scale -50 -- --client-ids 9 --num-clients 10 --port 8080
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import worker  # noqa: E402
from fl.client import participant  # noqa: E402
from fl.client.steps import Update  # noqa: E402
from fl.common.layout import Layout  # noqa: E402


@dataclass(frozen=True)
class Poison:
    """An update step after ``Pack``: the flat floats moved to base + scale x (honest delta)."""

    scale: float

    def apply(self, update: Update) -> Update:
        if update.body is None or "flat" not in update.body:
            raise SystemExit("the attacker sends float updates (no --quantization)")
        layout = Layout.of(update.base)
        base = layout.flatten(update.base)[0]
        floats = update.body["flat"]["float"]
        poisoned = base + self.scale * (floats - base)
        for e in layout.entries:  # BatchNorm variances stay honest: a negative one is refused outright
            if e.name.endswith("running_var"):
                poisoned[e.offset:e.offset + e.numel] = floats[e.offset:e.offset + e.numel]
        flat = {**update.body["flat"], "float": poisoned}
        return dataclasses.replace(update, body={**update.body, "flat": flat})


def poison(scale: float) -> None:
    honest = participant.Participant.update_steps

    def poisoned(self, training):  # type: ignore[no-untyped-def]
        return [*honest(self, training), Poison(scale)]

    participant.Participant.update_steps = poisoned


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=-50.0, help="factor applied to the honest delta")
    p.add_argument("worker_args", nargs=argparse.REMAINDER, help="-- then worker.py's arguments")
    a = p.parse_args()
    poison(a.scale)
    args = a.worker_args[1:] if a.worker_args[:1] == ["--"] else a.worker_args
    return worker.main(args)


if __name__ == "__main__":
    sys.exit(main())
