"""The two ways a secure-aggregation step fails.

``SecAggError``: one message was bad (wrong types or sizes, an unknown or repeated client,
a share that fails authentication). The state machine is unchanged, so the caller drops
that peer and goes on; ``str(e)`` is one line for an ERROR frame or a log.

``SecAggAbort``: the round cannot complete (fewer than the threshold of clients left at a
stage, or a secret that cannot be reconstructed). Nothing of the round is usable; the
caller reports it and runs the round again with fresh keys.
"""
from __future__ import annotations


class SecAggError(ValueError):
    """A refused message; the state machine has not changed."""


class SecAggAbort(RuntimeError):
    """The round cannot complete; start a new one (new keys, new masks)."""
