"""The wire's exceptions, below every codec (frames, control messages, the safe decoder)."""
from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame or message."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (possibly in the middle of a frame)."""


class RemoteError(ProtocolError):
    """The peer sent an ERROR message; its (sanitized) reason is the exception text."""
