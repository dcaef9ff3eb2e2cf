"""The ways a secure-aggregation step fails.

``SecAggError``: one message was bad (wrong types or sizes, an unknown or repeated client,
a share that fails authentication). The state machine is unchanged, so the caller drops
that peer and goes on; ``str(e)`` is one line for an ERROR frame or a log.

``SecAggAbort``: the round cannot complete (fewer than the threshold of clients left at a
stage, or a secret that cannot be reconstructed). Nothing of the round is usable; the
caller reports it and runs the round again with fresh keys.

``SecAggCheat``: a ``SecAggError`` whose message proves its sender broke the protocol (a
public key of small order, an unmasking share that does not match its dealer's
commitment). An honest client never sends one, so the caller excludes that client, not
only the message. ``SecAggAbort.culprits`` names the clients an abort is proven to be due
to (a dealer whose verified shares do not rebuild its committed secret), and
``SecAggAbort.suspects`` the clients whose secrets could not be rebuilt because holders
could not open the shares they dealt (unproven: a holder's word, so the caller leaves them
out of the round's next attempt only).
"""
from __future__ import annotations


class SecAggError(ValueError):
    """A refused message; the state machine has not changed."""


class SecAggCheat(SecAggError):
    """A refused message that proves ``client`` cheated; the state machine has not changed."""

    def __init__(self, client: int, reason: str) -> None:
        super().__init__(reason)
        self.client = client


class SecAggAbort(RuntimeError):
    """The round cannot complete; start a new one (new keys, new masks). ``culprits``: the
    clients proven to have caused it (empty when it is nobody's proven fault); ``suspects``:
    those its holders say dealt shares they could not open."""

    def __init__(self, reason: str, culprits: tuple[int, ...] = (), suspects: tuple[int, ...] = ()) -> None:
        super().__init__(reason)
        self.culprits = culprits
        self.suspects = suspects
