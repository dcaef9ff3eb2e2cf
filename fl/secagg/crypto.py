"""Key agreement and authenticated encryption for secure aggregation, all from ``cryptography``.

- **X25519** key pairs: every client makes two per round, ``c`` (to encrypt the shares it
  sends through the server) and ``s`` (to agree the pairwise mask seeds). They are kept
  apart as in Bonawitz et al.: the server may learn a dropped client's ``s`` private key
  (that is how its masks are removed) without learning its ``c`` key, which would open
  the shares of other clients' secrets that it holds.
- **HKDF-SHA256** turns each Diffie-Hellman output (and each self-mask seed) into a
  32-byte key, with an ``info`` naming the purpose, the round and the two clients, so no
  key serves two purposes or two rounds.
- **AES-256-GCM** encrypts a share for its holder. The associated data binds the round,
  the sender and the receiver: a share replayed from another round, or re-addressed to
  or from another client, fails authentication, as does any flipped bit.
- **SHA-256** commits each client to its self-mask seed, so a wrong share is caught when
  the seed is reconstructed, and each dealer to every share it deals (:func:`share_digest`),
  so a holder that reveals another share than it was dealt is caught, and named.
- Public keys of small order are refused (:func:`check_public`): with one, every key
  agreement gives the all-zero secret, which ``cryptography`` refuses to return.
"""
from __future__ import annotations

import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fl.secagg.errors import SecAggError

KEY_BYTES = 32  # X25519 keys, derived keys and seeds
NONCE_BYTES = 12
TAG_BYTES = 16
SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES
DOMAIN = b"fl-secagg/v1/"
_IDS = struct.Struct("!qqq")  # round, then two client ids


def context(purpose: bytes, round_id: int, a: int, b: int) -> bytes:
    """The HKDF info / AEAD associated data for ``purpose`` in round ``round_id`` between ``a``
    and ``b`` (order matters: callers sort the pair for symmetric keys)."""
    return DOMAIN + purpose + b"/" + _IDS.pack(round_id, a, b)


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh private key and its raw 32-byte public key."""
    sk = X25519PrivateKey.generate()
    return sk, public_bytes(sk)


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def private_key(raw: bytes) -> X25519PrivateKey:
    """The private key of 32 raw bytes (a reconstructed secret)."""
    return X25519PrivateKey.from_private_bytes(raw)


def check_public(public: bytes) -> bool:
    """Whether a raw X25519 public key is usable: an exchange with a fresh key does not give
    the all-zero secret (the mark of a small-order point, whatever the private key)."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def derive(secret: bytes, info: bytes) -> bytes:
    """A 32-byte key for ``info`` from high-entropy ``secret`` (HKDF-SHA256, no salt)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def agree(sk: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """The key that ``sk``'s owner and ``peer_public``'s owner both derive for ``info``.

    A peer key of small order (an all-zero shared secret) is refused with SecAggError."""
    try:
        shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise SecAggError(f"key agreement failed: {e}") from None
    return derive(shared, info)


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """``nonce | ciphertext | tag``; ``SEAL_OVERHEAD`` bytes longer than ``plaintext``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, sealed: bytes, ad: bytes) -> bytes:
    """The plaintext of :func:`seal`'s output; anything tampered, replayed or re-addressed
    (another key or associated data) raises SecAggError."""
    if len(sealed) < SEAL_OVERHEAD:
        raise SecAggError("sealed share too short")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], ad)
    except InvalidTag:
        raise SecAggError("share failed authentication (tampered, replayed or misaddressed)") from None


def commit(seed: bytes, round_id: int, client: int) -> bytes:
    """A hash commitment to a random 32-byte seed: the server checks the seed it reconstructs
    against it, so a wrong share aborts the round instead of corrupting the sum. (The seed
    has 256 bits of entropy, so its hash reveals nothing usable about it.)"""
    return hashlib.sha256(context(b"commit", round_id, client, client) + seed).digest()


def share_digest(kind: bytes, round_id: int, dealer: int, holder: int, share: bytes) -> bytes:
    """The dealer's commitment to the share of its secret ``kind`` (b"b" or b"sk") it deals to
    ``holder``. It hides the share as well as ``commit`` and the public key hide the secrets
    themselves: with fewer than t other shares a share is a one-to-one function of a 256-bit
    secret."""
    return hashlib.sha256(context(b"share-digest/" + kind, round_id, dealer, holder) + share).digest()
