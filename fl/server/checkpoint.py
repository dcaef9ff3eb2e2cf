"""Durable run state: atomic checkpoints and the JSON Lines metrics file.

A checkpoint is written to a temporary file, fsynced and renamed over the old one, so a
crash at any instant leaves either the previous round's checkpoint or this one, never a
torn file. It is read back with ``weights_only=True`` like anything else from outside.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

FORMAT = 2  # 2: metrics and the Python RNG state travel as JSON text (1: as pickled objects)

# What the run reads from every record of a resumed history (the summary, the progress bar),
# with the types it reads them as: a record without one stopped the run after its first round.
RECORD_FIELDS: dict[str, tuple[type, ...]] = {"round": (int,), "accuracy": (int, float), "loss": (int, float),
                                              "bytes_up": (int,), "bytes_down": (int,)}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class History:
    """The run's round records, each JSON-encoded once. Every checkpoint carries them all,
    and they grow by a record per client per round: re-encoding the lot each round made
    checkpointing quadratic (at 50 clients, most of the server's CPU after 30 rounds)."""

    def __init__(self, records: Iterable[dict[str, Any]] = ()) -> None:
        self._records: list[dict[str, Any]] = []
        self._lines: list[str] = []
        for r in records:
            self.append(r)

    def append(self, record: dict[str, Any]) -> None:
        self._lines.append(json.dumps(record))
        self._records.append(record)

    def to_json(self) -> str:
        return "[" + ",".join(self._lines) + "]"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._records[i]


def save(path: str | Path, model: dict[str, torch.Tensor], round_num: int,
         metrics: History | Iterable[dict[str, Any]], config: dict[str, Any],
         strategy: dict[str, Any] | None = None, privacy: dict[str, Any] | None = None,
         schedule: dict[str, Any] | None = None) -> None:
    """Metrics, settings and the Python RNG state go in as JSON text: pickled, every dict
    and number would cost ``torch.save`` a Python callback. ``strategy`` is the strategy's
    state (server momentum, Adam moments); ``privacy`` the DP accountant's (the rounds it
    charged), None without DP; ``schedule`` the asynchronous schedule's model version and
    dispatch count, None for synchronous rounds. No credentials are ever passed in here."""
    metrics_json = metrics.to_json() if isinstance(metrics, History) else json.dumps(list(metrics))
    state = {"format": FORMAT, "round": round_num, "model": model, "metrics": metrics_json,
             "config": json.dumps(config), "strategy": strategy or {}, "privacy": json.dumps(privacy),
             "schedule": json.dumps(schedule),
             "torch_rng": torch.get_rng_state(), "python_rng": json.dumps(random.getstate())}
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save` (or a bare state_dict); ValueError if it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"not a readable checkpoint ({type(exc).__name__})") from None
    if isinstance(state, dict) and "format" not in state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {"format": FORMAT, "round": 0, "model": state, "metrics": [], "config": {}}
    if not isinstance(state, dict) or state.get("format") not in (1, FORMAT) or "model" not in state:
        raise ValueError("not a checkpoint of this program")
    if state["format"] == 2:
        try:
            state["metrics"] = json.loads(state["metrics"])
            state["python_rng"] = json.loads(state["python_rng"])
            for key in ("config", "privacy", "schedule"):  # not in every format-2 checkpoint
                if isinstance(state.get(key), str):
                    state[key] = json.loads(state[key])
        except (KeyError, TypeError, ValueError, RecursionError):
            raise ValueError("checkpoint metrics, settings, RNG or privacy state are not valid JSON") from None
    return state


def check(state: dict[str, Any], reference: dict[str, torch.Tensor], max_round: int) -> None:
    """A loaded checkpoint is data from outside, like an update: check it before resuming
    from it (round, model keys, shapes, dtypes, finite values, variances, RNG states,
    metrics). Raises ValueError with one line."""
    from fl.common.vectors import InvalidUpdate
    from fl.server.contribution import validate_state

    round_num = state.get("round")
    if type(round_num) is not int or not 0 <= round_num <= max_round:
        raise ValueError(f"round {round_num!r} is not a round number in 0..{max_round}")
    try:
        validate_state(state["model"], reference)
    except InvalidUpdate as exc:
        raise ValueError(f"model: {exc}") from None
    for name, t in state["model"].items():
        if name.endswith("running_var") and bool((t < 0).any()):
            raise ValueError(f"model: {name} holds negative variances")
    check_records(state.get("metrics"), round_num)
    for key, what in (("privacy", "the privacy accountant state"), ("schedule", "the asynchronous schedule")):
        if not isinstance(state.get(key), (dict, type(None))):
            raise ValueError(f"{what} is not a dict")
    rng = state.get("torch_rng")
    if rng is not None and (not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8
                            or rng.shape != torch.get_rng_state().shape):
        raise ValueError("torch RNG state is malformed")
    py = state.get("python_rng")
    if py is not None:
        try:
            random.Random().setstate((py[0], tuple(py[1]), py[2]))
        except (TypeError, ValueError, IndexError, KeyError, OverflowError):
            raise ValueError("Python RNG state is malformed") from None
    if not isinstance(state.get("strategy", {}), dict):
        raise ValueError("strategy state is not a dict")


def check_records(metrics: Any, round_num: int) -> None:
    """The history a run resumes with: records of rounds 1..``round_num`` in increasing
    order, each with :data:`RECORD_FIELDS`. Raises ValueError with one line."""
    if not isinstance(metrics, list) or not all(isinstance(m, dict) for m in metrics):
        raise ValueError("metrics are not a list of records")
    last = 0
    for i, record in enumerate(metrics):
        for key, types in RECORD_FIELDS.items():
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, types):
                raise ValueError(f"metrics record {i + 1} has no valid {key!r} (got {value!r})"[:200])
        if not last < record["round"] <= round_num:
            raise ValueError(f"metrics record {i + 1} is for round {record['round']}, "
                             f"expected one in {last + 1}..{round_num}")
        last = record["round"]


def restore_rng(state: dict[str, Any]) -> None:
    if isinstance(state.get("torch_rng"), torch.Tensor):
        torch.set_rng_state(state["torch_rng"])
    py = state.get("python_rng")
    if isinstance(py, (tuple, list)) and len(py) == 3:
        random.setstate((py[0], tuple(py[1]), py[2]))


def rewrite_metrics(path: str | Path, history: Iterable[dict[str, Any]]) -> None:
    """Make the metrics file hold exactly ``history`` (after a resume: no gaps, no repeats)."""
    text = "".join(json.dumps(m) + "\n" for m in history)
    atomic_write(path, lambda f: f.write(text.encode()))


def append_metrics(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Complete lines only: a run still writing its last line is read without it."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]
