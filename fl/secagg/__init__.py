"""Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+ sparse graphs, Bell et al., CCS
2020): the server learns the sum of the clients' vectors and nothing else about any one
of them, even when some clients drop out mid-round.

Transport-agnostic and pure: no sockets, no threads. Each stage is a method that takes and
returns plain messages (dicts of ints, bytes and 1-D integer tensors) that survive
``torch.save`` / ``torch.load(weights_only=True)``, so the project's framed messages can
carry them unchanged.

=================  ============================================================
module             concern
=================  ============================================================
``fixedpoint``     float updates <-> the ring Z_{2^k} (clip, scale, round)
``shamir``         t-out-of-n secret sharing (pycryptodome, GF(2^128))
``crypto``         X25519 key agreement, HKDF, AES-GCM for shares in transit
``masking``        ChaCha20 PRG, pairwise and self masks, arithmetic mod 2^k
``graph``          who shares with whom: everyone, or a SecAgg+ Harary graph
``messages``       wire schema and validation of every field
``rounds``         the state machines ``SecAggClient`` and ``SecAggServer``
``errors``         ``SecAggError`` (a bad message), ``SecAggCheat`` (one that proves its
                   sender cheated) and ``SecAggAbort`` (no round)
=================  ============================================================
"""
from __future__ import annotations

from fl.secagg.errors import SecAggAbort, SecAggCheat, SecAggError
from fl.secagg.fixedpoint import FixedPoint
from fl.secagg.rounds import SecAggClient, SecAggConfig, SecAggServer, Stage

__all__ = [
    "FixedPoint",
    "SecAggAbort",
    "SecAggCheat",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggServer",
    "Stage",
]
