"""Who may join: HMAC challenge-response against a key ring, and per-direction session keys.

The handshake proves on both sides that the peer knows the secret of the client id it
claims, without sending it; binds the proofs to this connection's nonces and to the exact
HELLO and CHALLENGE bytes (so client id, sample count and options cannot be altered in
flight); and derives two keys, one per direction, that tag every later frame, so a frame
reflected back to its sender fails. Its messages are bounded JSON (``control.py``):
nothing from an unauthenticated peer reaches ``torch.load``. TLS, when configured, adds
confidentiality underneath.

Every WELCOME says what the server trains (``Terms``: model, layout fingerprint, dataset),
and a client whose model has another layout stops there (``Mismatch``), before any
training. A client that asks to join (``join``) is also told the run's data split and,
when it brought no id, the one the server gave it. The server's proof covers all of
WELCOME's fields, so none can be altered in flight. It comes back with that id on a
connection of its own, and again after any lost connection, so it keeps its shard.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from fl.wire.control import NONCE_SIZE
from fl.wire.credentials import SECRET_ENV, KeyRing
from fl.wire.errors import ConnectionClosed, ProtocolError, RemoteError
from fl.wire.frames import HANDSHAKE_MAX_FRAME, VERSION, Connection, MsgType, encode_body

_DECOY = secrets.token_bytes(32)  # an unknown client id costs the same HMAC as a known one


class AuthError(ProtocolError):
    """The peer could not prove it knows the secret (or we cannot prove it to it)."""


class Refused(ProtocolError):
    """The server turns an authenticated client away (no free shard, an id outside them);
    the reason is sent to the client as its ERROR."""


class BadWelcome(ProtocolError):
    """The server's WELCOME is malformed or unusable: the client stops, it does not retry."""


class Mismatch(ProtocolError):
    """The server trains another model (or dataset) than this client: a setting to fix, not
    a fault to retry; the client prints the one line and exits 2."""


@dataclass(frozen=True)
class Terms:
    """What a run trains, as every WELCOME tells it: the model's name (a built-in, or
    package.module:factory), its state_dict's layout fingerprint, the dataset."""

    model: str
    layout: int
    dataset: str

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "layout": self.layout, "dataset": self.dataset}

    @classmethod
    def of(cls, welcome: dict[str, Any]) -> "Terms | None":
        """The server's terms from WELCOME's fields; None from a server that sends none."""
        if not all(k in welcome for k in ("model", "layout", "dataset")):
            return None
        return cls(welcome["model"], welcome["layout"], welcome["dataset"])

    def check(self, server: "Terms | None") -> None:
        """Mismatch, one line naming both sides, unless the server trains what we would."""
        if server is None:
            raise Mismatch(f"the server does not say which model it trains; this client trains {self.model} "
                           "(the server predates the model seam: update it)")
        if server.dataset != self.dataset:
            raise Mismatch(f"the server trains on --dataset {server.dataset}, this client on {self.dataset}: "
                           f"start the client with --dataset {server.dataset}")
        if server.layout != self.layout:
            same = " (the same name: the factory or the folder's classes differ)" if server.model == self.model else ""
            raise Mismatch(f"the server trains --model {server.model} (layout {server.layout:016x}), this client "
                           f"has --model {self.model} (layout {self.layout:016x}){same}: start the client with "
                           f"--model {server.model}")


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


def welcome_hash(transcript_hash: bytes, extras: dict[str, Any]) -> bytes:
    """What the server's proof covers: the transcript, and WELCOME's other fields when it
    has any (canonical JSON, as both sides hold them after the schema check)."""
    if not extras:
        return transcript_hash  # the proof every client has always checked
    fields = json.dumps(extras, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return hashlib.sha256(transcript_hash + fields).digest()


def session_keys(secret: bytes, transcript_hash: bytes) -> SessionKeys:
    """One key per direction, from the same transcript."""
    return SessionKeys(proof(secret, b"fl-key client->server", transcript_hash),
                       proof(secret, b"fl-key server->client", transcript_hash))


@dataclass
class Peer:
    """What the server learns about a client from an accepted handshake. A joining peer
    only asks for its id and the split; its session comes on a later connection."""

    client_id: int | None  # None: joining, and asking for a free id
    num_samples: int
    options: dict[str, Any]
    joining: bool = False


Join = Callable[[Peer], dict[str, Any]]  # WELCOME's fields for a peer, or Refused


def server_handshake(conn: Connection, keyring: KeyRing | bytes | None, timeout: float,
                     join: Join | None = None) -> Peer:
    """Run the server side; on success the connection's keys are set (when the key ring
    requires authentication). The key ring is asked for the secret of the client id the
    HELLO claims, so with per-client secrets nobody can take over another's id (bytes or
    None are shorthand for a shared secret or an open server). ``join`` gives WELCOME's
    fields for an authenticated peer, or raises Refused (sent as an ERROR). ``timeout``
    bounds the whole exchange: a peer dribbling its frames cannot stretch it."""
    ring = keyring if isinstance(keyring, KeyRing) else KeyRing(shared=keyring or None)
    end = time.monotonic() + timeout

    def left() -> float:
        return max(0.01, end - time.monotonic())

    hello = conn.recv(MsgType.HELLO, timeout=left(), max_size=HANDSHAKE_MAX_FRAME)  # schema-checked
    hello_raw = bytes(hello.raw)
    peer = Peer(hello.body.get("client_id"), hello.body["num_samples"], hello.body["options"],
                hello.body.get("join", False))
    if peer.client_id is None and not peer.joining:
        raise ProtocolError("HELLO lacks 'client_id'")
    challenge_raw = encode_body(MsgType.CHALLENGE, {"nonce": secrets.token_hex(NONCE_SIZE), "auth": ring.required})
    conn.send_payload(MsgType.CHALLENGE, challenge_raw, timeout=left())
    auth = conn.recv(MsgType.AUTH, timeout=left(), max_size=HANDSHAKE_MAX_FRAME)
    digest = transcript(hello_raw, challenge_raw)
    secret = _check_proof(conn, ring, peer, auth.body["proof"], digest) if ring.required else None
    try:
        extras = join(peer) if join is not None else {}
    except Refused as exc:
        conn.send_error(str(exc))
        raise
    given = proof(secret, b"fl-server", welcome_hash(digest, extras)).hex() if secret is not None else None
    conn.send(MsgType.WELCOME, {"proof": given, **extras}, timeout=left())
    if secret is not None:
        keys = session_keys(secret, digest)
        conn.set_keys(send=keys.server_to_client, recv=keys.client_to_server)
    return peer


def _check_proof(conn: Connection, ring: KeyRing, peer: Peer, given: str | None, digest: bytes) -> bytes:
    """The secret the peer proved; AuthError (and an ERROR to the peer) when it did not."""
    if peer.client_id is None and ring.per_client is not None:
        conn.send_error("this server gives each client its own secret: start the client with its --client-id")
        raise AuthError("a client without an id asked to join a server of per-client secrets")
    secret = ring.secret_for(peer.client_id) if peer.client_id is not None else ring.shared
    expected = proof(secret if secret is not None else _DECOY, b"fl-client", digest)
    # given is None when the client holds no secret
    if secret is None or given is None or not hmac.compare_digest(bytes.fromhex(given), expected):
        conn.send_error("authentication failed: wrong or missing secret")
        why = "no secret is listed for this client id" if secret is None else "wrong or missing secret"
        raise AuthError(f"client {_name(peer)} failed authentication ({why})")
    return secret


def _name(peer: Peer) -> str:
    return "without an id" if peer.client_id is None else str(peer.client_id)


def client_handshake(
    conn: Connection, client_id: int | None, num_samples: int, options: dict[str, Any],
    secret: bytes | None, timeout: float, join: bool = False,
) -> dict[str, Any]:
    """Run the client side; refuses a server that cannot prove the secret when we hold one.
    ``join`` asks for the split (and an id, when ``client_id`` is None); returns WELCOME's
    fields besides the proof (``client_id``, ``split``, the ``Terms``), checked in shape only."""
    hello = {"num_samples": num_samples, "options": options, "nonce": secrets.token_hex(NONCE_SIZE)}
    if client_id is not None:
        hello["client_id"] = client_id
    if join:
        hello["join"] = True
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
    try:
        welcome = conn.recv(MsgType.WELCOME, timeout=timeout, max_size=HANDSHAKE_MAX_FRAME)
    except (ConnectionClosed, RemoteError):
        raise
    except ProtocolError as exc:  # a schema error: retrying would only get the same again
        raise BadWelcome(f"the server's WELCOME is malformed: {exc}") from None
    extras = {k: v for k, v in welcome.body.items() if k != "proof"}
    asked = [k for k in ("client_id", "split") if k in extras]
    if asked and not join:
        raise BadWelcome(f"the server's WELCOME has {asked[0]!r}, which this client did not ask for")
    if secret is not None:
        given = welcome.body["proof"]
        expected = proof(secret, b"fl-server", welcome_hash(digest, extras))
        if given is None or not hmac.compare_digest(bytes.fromhex(given), expected):
            raise AuthError("the server failed to prove the shared secret")
        keys = session_keys(secret, digest)
        conn.set_keys(send=keys.client_to_server, recv=keys.server_to_client)
    return extras
