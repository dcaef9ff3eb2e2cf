"""The protocol's exceptions, in a module of their own so that the codecs beside
``protocol.py`` (``control.py``, ``safe_decode.py``) can raise them without an import cycle.
``protocol`` re-exports them; import them from there."""
from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame or message."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (possibly in the middle of a frame)."""


class RemoteError(ProtocolError):
    """The peer sent an ERROR message; its (sanitized) reason is the exception text."""
