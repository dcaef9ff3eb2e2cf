"""Ending a command-line process cleanly: SIGTERM as Ctrl-C, and an exit that does not
finalize the interpreter under threads inside torch.

When the interpreter finalizes, a daemon thread that wants the GIL back is ended with
``pthread_exit``, whose unwinding through torch's C++ frames aborts the whole process
(SIGABRT, "terminate called without an active exception"): the exit status is lost and
the launcher sees a crash. ``worker.py``'s hosted clients are daemon threads (one blocked
on its socket cannot be joined), so it ends with :func:`exit_now` instead.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, so a process its launcher
    stops runs its ``finally`` blocks (children stopped, pools shut down) as on Ctrl-C."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def exit_now(status: int) -> NoReturn:
    """Flush the logs and standard streams, then end the process with ``status`` at once,
    without finalizing the interpreter (no atexit handlers: close what needs closing first)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
