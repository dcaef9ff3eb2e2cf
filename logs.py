"""Logging that coexists with tqdm bars: records go through ``tqdm.write``."""
from __future__ import annotations

import logging
import sys

from tqdm import tqdm


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


def sanitize(text: str, limit: int = 200) -> str:
    """Peer-provided text made safe for a log line (temporary; the wire branch owns this)."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[:limit])
    return out + ("..." if len(str(text)) > limit else "")
