"""Client id lists as the command line writes them (``"0-49,60,70-79"``): ``worker.py``
reads them and ``simulate.py`` writes them, so both use this one torch-free spelling."""
from __future__ import annotations


def parse_ids(spec: str) -> list[int]:
    """``"0-49,60,70-79"`` -> the sorted, distinct ids; ValueError on a malformed spec."""
    ids: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise ValueError(f"bad client id range {part!r} (expected N or N-M)") from None
        if first < 0 or last < first:
            raise ValueError(f"bad client id range {part!r} (expected 0 <= N <= M)")
        ids.update(range(first, last + 1))
    return sorted(ids)


def format_ids(ids: list[int]) -> str:
    """The inverse of parse_ids, compact: [0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
