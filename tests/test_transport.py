"""transport.py's RefusalLog: a flood of refused connections is a few counted lines; and the
wait for a peer's next frame that reads nothing."""
from __future__ import annotations

import logging
import socket
import time

from fl.server.transport import RefusalLog
from fl.wire.frames import wait_readable


def messages(caplog) -> list[str]:
    out = [r.getMessage() for r in caplog.records]
    caplog.clear()
    return out


def test_a_flood_of_refusals_is_one_line_per_interval(caplog):
    refusals = RefusalLog(interval=10.0)
    with caplog.at_level(logging.WARNING, logger="server"):
        for i in range(1000):
            refusals.count("failed handshake (ProtocolError)" if i % 2 else "too many handshakes")
        assert messages(caplog) == ["refused 1 connection(s): 1 too many handshakes"]  # the first, at once
        refusals.tick()
        assert messages(caplog) == []  # still inside the interval: counted only
        refusals.last -= 10.0  # the interval has passed: the server loop's next tick logs the rest
        refusals.tick()
        assert messages(caplog) == ["refused 999 connection(s): 500 failed handshake (ProtocolError); "
                                    "499 too many handshakes"]
        refusals.count("failed authentication")
        refusals.tick()
        assert messages(caplog) == []
        refusals.flush()  # at exit, whatever is left
        assert messages(caplog) == ["refused 1 connection(s): 1 failed authentication"]
        refusals.flush()
        assert messages(caplog) == []


def test_wait_readable_returns_on_data_hang_up_or_deadline():
    a, b = socket.socketpair()
    try:
        start = time.monotonic()
        wait_readable(a, start + 0.2)  # nothing sent: the deadline ends the wait
        assert 0.15 <= time.monotonic() - start < 2.0
        b.sendall(b"x")
        start = time.monotonic()
        wait_readable(a, start + 30.0)
        wait_readable(a)  # no deadline: returns because a byte is waiting
        assert time.monotonic() - start < 1.0 and a.recv(1) == b"x"  # nothing was read by the waits
        b.close()
        wait_readable(a)  # a hang-up also ends the wait
        assert a.recv(1) == b""
    finally:
        a.close()
        b.close()
