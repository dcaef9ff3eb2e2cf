"""A run does not replace a previous run's files by surprise.

The server rewrites ``--metrics`` at start-up and ``--checkpoint`` after its first round,
so starting a second run in the folder of a finished one used to erase it without a
word. Here a run that finds either file refuses, unless it was told what to do with
them: ``--resume`` continues that run, ``--overwrite`` starts afresh. ``server.py``
(through ``app.main``) and ``simulate.py`` call the same check.
"""
from __future__ import annotations

from pathlib import Path


class OutputsError(ValueError):
    """The run would replace a previous run's files; its text is the one line to show."""


def check_outputs(checkpoint: str | Path, metrics: str | Path, resume: bool, overwrite: bool) -> None:
    """Raise OutputsError unless the run may write ``checkpoint`` and ``metrics``. An empty
    metrics file (a run that stopped before its first round) holds nothing to lose."""
    if resume and overwrite:
        raise OutputsError("--resume continues the previous run and --overwrite replaces it: give one")
    if resume or overwrite:
        return
    found = [str(p) for p in (checkpoint, metrics) if Path(p).is_file() and Path(p).stat().st_size > 0]
    if found:
        raise OutputsError(f"a previous run's files are here ({', '.join(found)}): --resume to continue it, "
                           "--overwrite to start afresh, or write elsewhere")
