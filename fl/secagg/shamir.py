"""Shamir t-out-of-n secret sharing of byte strings, on pycryptodome's implementation.

``Crypto.Protocol.SecretSharing.Shamir`` (maintained, BSD) shares one 16-byte secret over
GF(2^128): a random polynomial of degree t-1 whose constant term is the secret, evaluated at
x = 1..n. Any t shares determine it by Lagrange interpolation; t-1 shares are consistent
with every possible secret (information-theoretically hidden), and interpolating them just
yields an unrelated value. Longer secrets (the 32-byte X25519 keys and mask seeds of secure
aggregation) are cut into 16-byte blocks, each shared with its own independent polynomial;
a share is the concatenation of the blocks' shares at the same x, so it is as long as the
secret.

Index limits: x is any nonzero field element, so n is unbounded in principle; shares of one
secret need distinct x. The library's field arithmetic is pure Python: sharing one block
among n holders costs n*t multiplications, reconstructing it t^2. That is negligible next
to the masks for tens of clients; for hundreds, SecAgg+ groups (``graph``) keep n and t small.
"""
from __future__ import annotations

from typing import Sequence

from Crypto.Protocol.SecretSharing import Shamir

BLOCK = 16
MAX_SHARES = 1 << 16  # far beyond any group; keeps indices (and their encoding) small

Share = tuple[int, bytes]  # (x, y): the holder's index and its share, as long as the secret


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or not secret or len(secret) % BLOCK:
        raise ValueError(f"a secret is a non-empty multiple of {BLOCK} bytes")


def share(secret: bytes, t: int, n: int) -> list[Share]:
    """``n`` shares of ``secret``, at x = 1..n; any ``t`` of them reconstruct it."""
    _check_secret(secret)
    if type(t) is not int or type(n) is not int or not 1 <= t <= n <= MAX_SHARES:
        raise ValueError(f"need 1 <= t <= n <= {MAX_SHARES}, got t={t!r}, n={n!r}")
    blocks = [Shamir.split(t, n, secret[i:i + BLOCK]) for i in range(0, len(secret), BLOCK)]
    return [(x, b"".join(block[x - 1][1] for block in blocks)) for x in range(1, n + 1)]


def reconstruct(shares: Sequence[Share], t: int) -> bytes:
    """The secret from ``t`` or more shares of a t-out-of-n sharing (the first ``t`` are used).

    Fewer than ``t`` shares are refused: interpolating them would give a wrong secret, not an
    error. Wrong shares cannot be detected here; callers check the result against a
    commitment (a public key, a hash)."""
    if type(t) is not int or t < 1:
        raise ValueError(f"t must be a positive int, got {t!r}")
    if len(shares) < t:
        raise ValueError(f"{len(shares)} shares cannot reconstruct a secret shared with threshold {t}")
    used = list(shares[:t])
    if not all(isinstance(s, tuple) and len(s) == 2 and type(s[0]) is int and isinstance(s[1], bytes) for s in used):
        raise ValueError("a share is a tuple (index, bytes)")
    size = len(used[0][1])
    if not size or size % BLOCK or any(len(y) != size for _, y in used):
        raise ValueError(f"shares must all be the same non-empty multiple of {BLOCK} bytes")
    if not all(1 <= x <= MAX_SHARES for x, _ in used):
        raise ValueError(f"share indices must be in [1, {MAX_SHARES}]")
    if len({x for x, _ in used}) != t:
        raise ValueError("shares with the same index")
    return b"".join(
        Shamir.combine([(x, y[i:i + BLOCK]) for x, y in used]) for i in range(0, size, BLOCK)
    )
