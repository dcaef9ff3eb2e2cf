"""Logging that coexists with tqdm bars (records go through ``tqdm.write``), and
``sanitize`` for text that came from a peer before it reaches a log line."""
from __future__ import annotations

import logging
import reprlib
import sys

from tqdm import tqdm

PEER_TEXT_LIMIT = 200
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, PEER_TEXT_LIMIT, PEER_TEXT_LIMIT


def sanitize(text: object, limit: int = PEER_TEXT_LIMIT) -> str:
    """``text`` as one bounded, printable line: a peer's string must not be able to forge
    log lines (CR, LF), drive the terminal (ESC sequences), reorder what is shown (bidi
    controls) or flood the log. Non-printable characters become escapes such as ``\\x1b``
    or ``\\u202e``; the result is cut near ``limit`` characters with a note of how much
    was left out. Anything but a str is shown through a depth- and size-bounded repr, so
    a deeply nested or huge object cannot recurse or allocate its way through str()."""
    if not isinstance(text, str):
        text = _repr.repr(text)
    if len(text) <= limit and text.isprintable():
        return text
    out: list[str] = []
    size = 0
    for i, ch in enumerate(text):
        if size >= limit:
            out.append(f"...[{len(text) - i} more chars]")
            break
        piece = ch if ch.isprintable() else ascii(ch)[1:-1]
        out.append(piece)
        size += len(piece)
    return "".join(out)


def short_ids(ids: list[int], shown: int = 10) -> str:
    """A list of ids for a log line, shortened: 1,000 clients must not make 1,000 numbers."""
    text = ", ".join(map(str, ids[:shown]))
    return text + (f", ... ({len(ids) - shown} more)" if len(ids) > shown else "")


class TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
