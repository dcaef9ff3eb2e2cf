"""Who shares keys and masks with whom: everybody (SecAgg), or a sparse graph (SecAgg+).

In SecAgg every client masks with, and secret-shares to, every other: per-client work and
bytes grow with n, the server's reconstruction with n^2. SecAgg+ (Bell et al. 2020) puts
the clients on a random Harary graph instead: order them by a random permutation and join
each to the ``d/2`` nearest on either side of the ring, ``d`` = ``num_shares - 1``. A client's
*group* is itself and its d neighbours; it masks with its neighbours and gives its secrets
to its group, of which any ``t`` reconstruct them. Costs then grow with d, not n; for
O(log n) groups Bell et al. show privacy and dropout robustness close to the full graph.

The permutation comes from a seed that the server draws and broadcasts with the keys, so
every client computes the same graph over the same key holders. (Against a server that
picks the seed to isolate someone, Bell et al. derive it jointly; not done here.)
"""
from __future__ import annotations

import hashlib
from typing import Sequence

GRAPH_DOMAIN = b"fl-secagg/v1/graph/"


def neighbours(ids: Sequence[int], seed: bytes, num_shares: int | None) -> dict[int, tuple[int, ...]]:
    """Each client's neighbours (sorted, itself excluded). ``num_shares`` is the group size
    (the client and its neighbours), odd so the Harary ring is symmetric; None, or at least
    ``len(ids)``, gives the complete graph."""
    clients = sorted(ids)
    if len(set(clients)) != len(clients):
        raise ValueError("client ids must be distinct")
    n = len(clients)
    if num_shares is None or num_shares >= n:
        return {u: tuple(v for v in clients if v != u) for u in clients}
    if num_shares < 1 or num_shares % 2 == 0:
        raise ValueError(f"num_shares must be odd and positive, got {num_shares}")
    # A uniformly random order: sort by a hash of (seed, id), i.e. a random function of the id.
    ring = sorted(clients, key=lambda u: hashlib.sha256(GRAPH_DOMAIN + seed + u.to_bytes(8, "big", signed=True)).digest())
    half = (num_shares - 1) // 2
    out = {}
    for i, u in enumerate(ring):
        out[u] = tuple(sorted(ring[(i + j) % n] for j in range(-half, half + 1) if j))
    return out


def group(links: dict[int, tuple[int, ...]], client: int) -> tuple[int, ...]:
    """``client`` and its neighbours, sorted: share x-coordinates are positions in it, plus one."""
    return tuple(sorted((client, *links[client])))
