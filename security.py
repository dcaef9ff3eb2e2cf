"""Who may join: shared-secret HMAC challenge-response, session keys, and TLS contexts.

The handshake proves on both sides that the peer knows the secret without sending it,
binds the proof to this connection's nonces and to the exact HELLO the client sent (so
client id and sample count cannot be altered in flight), and derives the key that tags
every later frame. TLS, when configured, adds confidentiality underneath.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Any

from protocol import HANDSHAKE_MAX_FRAME, Connection, MsgType, ProtocolError, encode_payload, field

SECRET_ENV = "FL_SECRET"
NONCE_SIZE = 32


class AuthError(ProtocolError):
    """The peer could not prove it knows the shared secret (or we cannot prove it to it)."""


def resolve_secret(flag: str | None) -> bytes | None:
    value = flag if flag is not None else os.environ.get(SECRET_ENV)
    return value.encode() if value else None


def transcript(hello: bytes, challenge: bytes) -> bytes:
    return hashlib.sha256(hello + challenge).digest()


def proof(secret: bytes, role: bytes, transcript_hash: bytes) -> bytes:
    """Distinct labels per role, so a proof can never be reflected back to its sender."""
    return hmac.new(secret, role + transcript_hash, hashlib.sha256).digest()


def session_key(secret: bytes, transcript_hash: bytes) -> bytes:
    return proof(secret, b"fl-session-key", transcript_hash)


@dataclass
class Peer:
    """What the server learns about a client from an accepted handshake."""

    client_id: int
    num_samples: int
    options: dict[str, Any]


def server_handshake(conn: Connection, secret: bytes | None, timeout: float) -> Peer:
    """Run the server side; on success the connection's key is set (when a secret is).
    ``timeout`` bounds the whole exchange: a peer dribbling its frames cannot stretch it."""
    end = time.monotonic() + timeout

    def left() -> float:
        return max(0.01, end - time.monotonic())

    hello = conn.recv(MsgType.HELLO, timeout=left(), max_size=HANDSHAKE_MAX_FRAME)
    hello_raw = bytes(hello.raw)
    client_id = field(hello.body, "client_id", int)
    num_samples = field(hello.body, "num_samples", int)
    options = field(hello.body, "options", dict)
    if not 0 <= client_id < 1_000_000:
        raise ProtocolError(f"implausible client id {client_id}")
    challenge = {"nonce": secrets.token_bytes(NONCE_SIZE), "auth": secret is not None}
    challenge_raw = encode_payload(challenge)
    conn.send_payload(MsgType.CHALLENGE, challenge_raw, timeout=left())
    auth = conn.recv(MsgType.AUTH, timeout=left(), max_size=HANDSHAKE_MAX_FRAME)
    if secret is not None:
        digest = transcript(hello_raw, challenge_raw)
        given = auth.body.get("proof")  # None when the client holds no secret
        if not isinstance(given, bytes) or not hmac.compare_digest(given, proof(secret, b"fl-client", digest)):
            conn.send_error("authentication failed: wrong or missing secret")
            raise AuthError(f"client {client_id} failed authentication (wrong or missing secret)")
        conn.send(MsgType.WELCOME, {"proof": proof(secret, b"fl-server", digest)}, timeout=left())
        conn.key = session_key(secret, digest)
    else:
        conn.send(MsgType.WELCOME, {"proof": None}, timeout=left())
    return Peer(client_id, num_samples, options)


def client_handshake(
    conn: Connection, client_id: int, num_samples: int, options: dict[str, Any],
    secret: bytes | None, timeout: float,
) -> None:
    """Run the client side; refuses a server that cannot prove the secret when we hold one."""
    hello = {"client_id": client_id, "num_samples": num_samples, "options": options,
             "nonce": secrets.token_bytes(NONCE_SIZE)}
    hello_raw = encode_payload(hello)
    conn.send_payload(MsgType.HELLO, hello_raw, timeout=timeout)
    challenge = conn.recv(MsgType.CHALLENGE, timeout=timeout, max_size=HANDSHAKE_MAX_FRAME)
    challenge_raw = bytes(challenge.raw)
    server_wants_auth = field(challenge.body, "auth", bool)
    if server_wants_auth and secret is None:
        conn.send(MsgType.AUTH, {"proof": None}, timeout=timeout)
        raise AuthError(f"the server requires a shared secret: pass --secret or set {SECRET_ENV}")
    if secret is not None and not server_wants_auth:
        raise AuthError("the server does not authenticate clients; refusing to join it with a secret")
    digest = transcript(hello_raw, challenge_raw)
    conn.send(MsgType.AUTH, {"proof": proof(secret, b"fl-client", digest) if secret else None},
              timeout=timeout)
    welcome = conn.recv(MsgType.WELCOME, timeout=timeout, max_size=HANDSHAKE_MAX_FRAME)
    if secret is not None:
        if not hmac.compare_digest(field(welcome.body, "proof", bytes), proof(secret, b"fl-server", digest)):
            raise AuthError("the server failed to prove the shared secret")
        conn.key = session_key(secret, digest)


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def client_tls_context(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
