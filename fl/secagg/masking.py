"""Masks that hide one client's vector and cancel in the sum, arithmetic in Z_{2^bits}.

Client u sends ``y_u = x_u + PRG(b_u) + sum_v sign(u, v) * PRG(s_uv)  (mod 2^bits)`` where

- ``s_uv`` is the key u and v agree from their X25519 mask keys (:func:`pair_key`), the
  same for both; ``sign(u, v)`` is +1 when u < v and -1 otherwise, so the pair's two masks
  cancel in ``y_u + y_v``;
- ``b_u`` is u's own random seed (:func:`self_key`): the server removes ``PRG(b_u)`` once
  it reconstructs ``b_u`` from the shares of u's survivors, so it never sees ``x_u`` with
  only the pairwise masks removed (which it could otherwise force by claiming u dropped).

**PRG**: the ChaCha20 keystream of ``cryptography`` (OpenSSL) under the 32-byte key, with
a fixed nonce (each key is derived for one stream only), read as little-endian words: 32-bit
words for ``bits`` <= 32, 64-bit words (reduced mod 2^bits) above. A word is uniform, so
its low ``bits`` are too: masks are uniform over the ring, and ``y_u`` alone says nothing
about ``x_u``.

Ring elements are int64 tensors in ``[0, 2^bits)``, ``bits`` <= 62, so adding two never
overflows; masks are folded in place, one keystream at a time.
"""
from __future__ import annotations

import sys
from typing import Iterable, Mapping

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fl.secagg.crypto import agree, context, derive

_NONCE = bytes(4) + b"fl-secagg-v1"  # ChaCha20's 16 bytes: a zero block counter, then 12


def ring_mask(bits: int) -> int:
    return (1 << bits) - 1


def _words(seed: bytes, length: int, bits: int) -> torch.Tensor:
    """The keystream as ``length`` int64 words congruent to the PRG's outputs mod 2^bits
    (32-bit words sign-extended for bits <= 32; 64-bit words already reduced above)."""
    width, dtype = (4, torch.int32) if bits <= 32 else (8, torch.int64)
    if not length:
        return torch.empty(0, dtype=torch.int64)
    buf = bytearray(length * width)
    # The keystream is the encryption of zeros (bytes(n) is calloc'd: no pass over memory).
    Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update_into(bytes(len(buf)), buf)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    if sys.byteorder == "big":
        raw = raw.view(-1, width).flip(1).contiguous().view(-1)
    words = raw.view(dtype)
    # An explicit widening copy: an in-place add that promotes int32 is ~3x slower.
    return words.to(torch.int64) if bits <= 32 else words.bitwise_and_(ring_mask(bits))


def add_mask(acc: torch.Tensor, seed: bytes, sign: int, bits: int) -> torch.Tensor:
    """``acc += sign * PRG(seed) (mod 2^bits)``, in place; ``acc`` is an int64 ring vector."""
    words = _words(seed, acc.numel(), bits)
    (acc.add_ if sign > 0 else acc.sub_)(words)
    return acc.bitwise_and_(ring_mask(bits))


def pair_sign(me: int, other: int) -> int:
    """+1 for the smaller id of a pair, -1 for the larger: the two masks cancel."""
    return 1 if me < other else -1


def pair_key(sk: X25519PrivateKey, peer_public: bytes, round_id: int, me: int, other: int) -> bytes:
    """``s_uv``: the pairwise mask key, the same from either end."""
    return agree(sk, peer_public, context(b"pair-mask", round_id, min(me, other), max(me, other)))


def self_key(seed: bytes, round_id: int, client: int) -> bytes:
    """The PRG key of client ``client``'s self mask, from its seed ``b_u``."""
    return derive(seed, context(b"self-mask", round_id, client, client))


def mask_input(
    x: torch.Tensor, bits: int, self_mask_key: bytes, pair_keys: Mapping[int, bytes], me: int
) -> torch.Tensor:
    """``y = x + PRG(self) + sum_v sign(me, v) PRG(s_v)  (mod 2^bits)``; a new tensor."""
    y = x.to(torch.int64, copy=True)
    add_mask(y, self_mask_key, 1, bits)
    for other, key in pair_keys.items():
        add_mask(y, key, pair_sign(me, other), bits)
    return y


def remove_masks(
    total: torch.Tensor, bits: int, self_mask_keys: Iterable[bytes], dropped_pairs: Iterable[tuple[bytes, int, int]]
) -> torch.Tensor:
    """The server's last step, in place on the sum of the survivors' masked inputs: subtract
    each survivor's self mask, and for each pair (key, survivor, dropped client) the mask the
    survivor added for a client whose own masked input never arrived."""
    for key in self_mask_keys:
        add_mask(total, key, -1, bits)
    for key, survivor, dropped in dropped_pairs:
        add_mask(total, key, -pair_sign(survivor, dropped), bits)
    return total
