"""Who may join: HMAC challenge-response against a key ring, and per-direction session keys.

The handshake proves on both sides that the peer knows the secret of the client id it
claims, without sending it; binds the proofs to this connection's nonces and to the exact
HELLO and CHALLENGE bytes (so client id, sample count and options cannot be altered in
flight); and derives two keys, one per direction, that tag every later frame, so a frame
reflected back to its sender fails. Its messages are bounded JSON (``control.py``):
nothing from an unauthenticated peer reaches ``torch.load``. TLS, when configured, adds
confidentiality underneath.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from fl.wire.control import NONCE_SIZE
from fl.wire.credentials import SECRET_ENV, KeyRing
from fl.wire.errors import ProtocolError
from fl.wire.frames import HANDSHAKE_MAX_FRAME, VERSION, Connection, MsgType, encode_body

_DECOY = secrets.token_bytes(32)  # an unknown client id costs the same HMAC as a known one


class AuthError(ProtocolError):
    """The peer could not prove it knows the secret (or we cannot prove it to it)."""


class SessionKeys(NamedTuple):
    client_to_server: bytes
    server_to_client: bytes


def transcript(hello: bytes, challenge: bytes) -> bytes:
    """Hash of the exact HELLO and CHALLENGE payloads (length-prefixed, so the boundary
    between them cannot move) under this protocol version."""
    return hashlib.sha256(b"fl-transcript-v%d" % VERSION + len(hello).to_bytes(4, "big")
                          + hello + challenge).digest()


def proof(secret: bytes, role: bytes, transcript_hash: bytes) -> bytes:
    """Distinct labels per role, so a proof can never be reflected back to its sender."""
    return hmac.new(secret, role + transcript_hash, hashlib.sha256).digest()


def session_keys(secret: bytes, transcript_hash: bytes) -> SessionKeys:
    """One key per direction, from the same transcript."""
    return SessionKeys(proof(secret, b"fl-key client->server", transcript_hash),
                       proof(secret, b"fl-key server->client", transcript_hash))


@dataclass
class Peer:
    """What the server learns about a client from an accepted handshake."""

    client_id: int
    num_samples: int
    options: dict[str, Any]


def server_handshake(conn: Connection, keyring: KeyRing | bytes | None, timeout: float) -> Peer:
    """Run the server side; on success the connection's keys are set (when the key ring
    requires authentication). The key ring is asked for the secret of the client id the
    HELLO claims, so with per-client secrets nobody can take over another's id (bytes or
    None are shorthand for a shared secret or an open server). ``timeout`` bounds the
    whole exchange: a peer dribbling its frames cannot stretch it."""
    ring = keyring if isinstance(keyring, KeyRing) else KeyRing(shared=keyring or None)
    end = time.monotonic() + timeout

    def left() -> float:
        return max(0.01, end - time.monotonic())

    hello = conn.recv(MsgType.HELLO, timeout=left(), max_size=HANDSHAKE_MAX_FRAME)  # schema-checked
    hello_raw = bytes(hello.raw)
    peer = Peer(hello.body["client_id"], hello.body["num_samples"], hello.body["options"])
    challenge_raw = encode_body(MsgType.CHALLENGE, {"nonce": secrets.token_hex(NONCE_SIZE), "auth": ring.required})
    conn.send_payload(MsgType.CHALLENGE, challenge_raw, timeout=left())
    auth = conn.recv(MsgType.AUTH, timeout=left(), max_size=HANDSHAKE_MAX_FRAME)
    if not ring.required:
        conn.send(MsgType.WELCOME, {"proof": None}, timeout=left())
        return peer
    digest = transcript(hello_raw, challenge_raw)
    secret = ring.secret_for(peer.client_id)
    expected = proof(secret if secret is not None else _DECOY, b"fl-client", digest)
    given = auth.body["proof"]  # None when the client holds no secret
    if secret is None or given is None or not hmac.compare_digest(bytes.fromhex(given), expected):
        conn.send_error("authentication failed: wrong or missing secret")
        why = "no secret is listed for this client id" if secret is None else "wrong or missing secret"
        raise AuthError(f"client {peer.client_id} failed authentication ({why})")
    conn.send(MsgType.WELCOME, {"proof": proof(secret, b"fl-server", digest).hex()}, timeout=left())
    keys = session_keys(secret, digest)
    conn.set_keys(send=keys.server_to_client, recv=keys.client_to_server)
    return peer


def client_handshake(
    conn: Connection, client_id: int, num_samples: int, options: dict[str, Any],
    secret: bytes | None, timeout: float,
) -> None:
    """Run the client side; refuses a server that cannot prove the secret when we hold one."""
    hello = {"client_id": client_id, "num_samples": num_samples, "options": options,
             "nonce": secrets.token_hex(NONCE_SIZE)}
    hello_raw = encode_body(MsgType.HELLO, hello)
    conn.send_payload(MsgType.HELLO, hello_raw, timeout=timeout)
    challenge = conn.recv(MsgType.CHALLENGE, timeout=timeout, max_size=HANDSHAKE_MAX_FRAME)
    challenge_raw = bytes(challenge.raw)
    server_wants_auth = challenge.body["auth"]
    if server_wants_auth and secret is None:
        conn.send(MsgType.AUTH, {"proof": None}, timeout=timeout)
        raise AuthError(f"the server requires a shared secret: pass --secret-file or set {SECRET_ENV}")
    if secret is not None and not server_wants_auth:
        raise AuthError("the server does not authenticate clients; refusing to join it with a secret")
    digest = transcript(hello_raw, challenge_raw)
    conn.send(MsgType.AUTH, {"proof": proof(secret, b"fl-client", digest).hex() if secret else None},
              timeout=timeout)
    welcome = conn.recv(MsgType.WELCOME, timeout=timeout, max_size=HANDSHAKE_MAX_FRAME)
    if secret is not None:
        given = welcome.body["proof"]
        if given is None or not hmac.compare_digest(bytes.fromhex(given), proof(secret, b"fl-server", digest)):
            raise AuthError("the server failed to prove the shared secret")
        keys = session_keys(secret, digest)
        conn.set_keys(send=keys.client_to_server, recv=keys.server_to_client)
