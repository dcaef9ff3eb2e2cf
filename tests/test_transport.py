"""transport.py's RefusalLog: a flood of refused connections is a few counted lines."""
from __future__ import annotations

import logging

from fl.server.transport import RefusalLog


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
