"""Every finished round's scalars as TensorBoard event files (``--tensorboard DIR``), the
round as the step, written on the evaluator's thread beside the metrics line.

The scalars are read from the round's record, so under DP only what the record releases
(``evaluator.DP_RECORD_KEYS``, and epsilon) can reach the event files. The writer is
``torch.utils.tensorboard``, which needs the ``tensorboard`` package: it is imported only
when a writer is made, so the server and the launcher run without it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MISSING = "--tensorboard needs the tensorboard package: pip install tensorboard"

# a round record's key -> its TensorBoard tag
SCALARS = {"accuracy": "test/accuracy", "loss": "test/loss",
           "bytes_up": "traffic/bytes_up", "bytes_down": "traffic/bytes_down",
           "round_s": "round/seconds", "clients": "round/clients", "participants": "round/participants",
           "lr": "round/lr", "epsilon": "privacy/epsilon"}


def available() -> bool:
    """Whether the tensorboard package can be imported (cheap: it loads no torch)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def problem(log_dir: str) -> str | None:
    """Why event files cannot go to ``log_dir``, in one line, or None: checked before the
    run starts, since the writer is made once the server already listens."""
    if not available():
        return MISSING
    path = Path(log_dir).absolute()
    while not path.exists():
        path = path.parent
    if not (path.is_dir() and os.access(path, os.W_OK | os.X_OK)):
        return f"--tensorboard {log_dir}: {path} is not a folder this user can write to"
    return None


class RoundScalars:
    """One run's event files in ``log_dir``. ``first_round`` is the step the run starts at:
    what an earlier run left in the same folder from that step on is hidden from TensorBoard
    (``purge_step``), so a resumed or overwritten run draws one line, not two."""

    def __init__(self, log_dir: str, first_round: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir, purge_step=first_round)

    def write(self, record: dict[str, Any]) -> None:
        """The record's scalars at step ``record["round"]``, flushed so a watching
        TensorBoard sees the round now."""
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], record["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
