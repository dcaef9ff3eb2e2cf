from __future__ import annotations

import json
import secrets
import socket
import ssl
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from procs import Worker

from fl.wire.credentials import SECRET_ENV, KeyRing, resolve_secret
from fl.wire.errors import ProtocolError, RemoteError
from fl.wire.frames import HANDSHAKE_MAX_FRAME, Connection, MsgType, encode_body, encode_payload
from fl.wire.handshake import AuthError, Peer, client_handshake, proof, server_handshake, session_keys, transcript
from fl.wire.tls import client_tls_context, server_tls_context, write_certificate

SECRET = b"correct horse battery staple"
TIMEOUT = 3.0


# --- helpers ----------------------------------------------------------------------------




class RecordingConnection(Connection):
    """Records the type of every frame it sends."""

    def __init__(self, sock, **kw):
        super().__init__(sock, **kw)
        self.sent_types: list[MsgType] = []

    def send_payload(self, msg_type, payload, timeout=None):
        self.sent_types.append(MsgType(msg_type))
        return super().send_payload(msg_type, payload, timeout)


def run_handshake(client_sock, server_sock, client_secret, server_secret,
                  client_id=7, num_samples=600, options=None):
    """Server in a thread, client here. Returns (client_conn, client_outcome, server_conn, server_outcome)."""
    options = {"quantization": False} if options is None else options
    sconn = RecordingConnection(server_sock)
    cconn = RecordingConnection(client_sock)

    def server():
        try:
            return server_handshake(sconn, server_secret, timeout=TIMEOUT)
        except BaseException:
            server_sock.close()  # like the real server: drop the connection
            raise

    w = Worker(server)
    try:
        client_handshake(cconn, client_id, num_samples, options, client_secret, timeout=TIMEOUT)
        client_outcome = None
    except BaseException as exc:  # noqa: BLE001
        client_outcome = exc
        client_sock.close()  # like the real client: give up on the connection
    return cconn, client_outcome, sconn, w.outcome()


# --- secrets and proofs -----------------------------------------------------------------

def test_resolve_secret(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert resolve_secret(None) is None
    assert resolve_secret("") is None
    assert resolve_secret("abc") == b"abc"
    assert resolve_secret("pässwort") == "pässwort".encode()
    monkeypatch.setenv(SECRET_ENV, "from-env")
    assert resolve_secret(None) == b"from-env"
    assert resolve_secret("flag-wins") == b"flag-wins"
    monkeypatch.setenv(SECRET_ENV, "")
    assert resolve_secret(None) is None


def test_proofs_are_role_bound():
    t = transcript(b"hello", b"challenge")
    client = proof(SECRET, b"fl-client", t)
    server = proof(SECRET, b"fl-server", t)
    keys = session_keys(SECRET, t)
    assert client != server
    assert keys.client_to_server != keys.server_to_client  # a reflected frame fails the tag check
    assert not {keys.client_to_server, keys.server_to_client} & {client, server}
    assert len(client) == len(server) == len(keys.client_to_server) == len(keys.server_to_client) == 32
    assert proof(SECRET, b"fl-client", t) == client and session_keys(SECRET, t) == keys  # deterministic
    assert proof(b"other", b"fl-client", t) != client


def hello_raw(client_id=1, nonce="6e" * 32) -> bytes:
    return encode_body(MsgType.HELLO, {"client_id": client_id, "num_samples": 5, "options": {}, "nonce": nonce})


def test_transcript_binds_both_messages():
    h, c = hello_raw(), encode_body(MsgType.CHALLENGE, {"nonce": "6e" * 32, "auth": True})
    base = transcript(h, c)
    assert len(base) == 32
    assert transcript(hello_raw(2), c) != base
    assert transcript(h, encode_body(MsgType.CHALLENGE, {"nonce": "6d" * 32, "auth": True})) != base
    assert transcript(b"ab", b"c") != transcript(b"a", b"bc")  # the boundary cannot move
    p = proof(SECRET, b"fl-client", base)
    assert p != proof(SECRET, b"fl-client", transcript(hello_raw(2), c))


# --- handshakes over socketpairs --------------------------------------------------------

def test_open_handshake_succeeds_without_key(pair):
    cconn, cres, sconn, sres = run_handshake(*pair, None, None, client_id=42, num_samples=123,
                                             options={"quantization": True})
    assert cres is None
    assert isinstance(sres, Peer)
    assert (sres.client_id, sres.num_samples, sres.options) == (42, 123, {"quantization": True})
    assert cconn.key is None and sconn.key is None
    assert cconn.sent_types == [MsgType.HELLO, MsgType.AUTH]
    assert sconn.sent_types == [MsgType.CHALLENGE, MsgType.WELCOME]
    # untagged frames flow afterwards
    sconn.send(MsgType.MODEL, {"round": 1}, timeout=TIMEOUT)
    assert cconn.recv(MsgType.MODEL, timeout=TIMEOUT).body == {"round": 1}


def test_same_secret_derives_same_key_and_frames_round_trip(pair):
    cconn, cres, sconn, sres = run_handshake(*pair, SECRET, SECRET, client_id=3)
    assert cres is None
    assert isinstance(sres, Peer) and sres.client_id == 3
    assert cconn.send_key is not None and len(cconn.send_key) == 32
    assert cconn.send_key == sconn.recv_key and cconn.recv_key == sconn.send_key
    assert cconn.send_key != cconn.recv_key
    assert SECRET not in cconn.send_key + cconn.recv_key
    state = {"w": torch.randn(5, 5)}
    sconn.send(MsgType.MODEL, {"round": 1, "state": state}, timeout=TIMEOUT)
    msg = cconn.recv(MsgType.MODEL, timeout=TIMEOUT)
    assert torch.equal(msg.body["state"]["w"], state["w"])
    cconn.send(MsgType.UPDATE, {"num_samples": 9}, timeout=TIMEOUT)
    assert sconn.recv(MsgType.UPDATE, timeout=TIMEOUT).body == {"num_samples": 9}


def test_session_keys_differ_between_sessions():
    keys = []
    for _ in range(2):
        a, b = socket.socketpair()
        try:
            cconn, cres, sconn, sres = run_handshake(a, b, SECRET, SECRET)
            assert cres is None and isinstance(sres, Peer)
            keys.append(cconn.key)
        finally:
            a.close()
            b.close()
    assert keys[0] != keys[1]  # fresh nonces, fresh key


def test_wrong_secret_is_refused_and_server_sends_no_welcome(pair):
    cconn, cres, sconn, sres = run_handshake(*pair, b"wrong secret", SECRET)
    assert isinstance(sres, AuthError)
    assert isinstance(cres, (RemoteError, AuthError))
    assert "authentication" in str(cres)
    assert MsgType.WELCOME not in sconn.sent_types and MsgType.MODEL not in sconn.sent_types
    assert sconn.sent_types == [MsgType.CHALLENGE, MsgType.ERROR]
    assert sconn.key is None and cconn.key is None


def test_client_without_secret_vs_server_with_secret(pair):
    cconn, cres, sconn, sres = run_handshake(*pair, None, SECRET)
    assert isinstance(cres, AuthError)
    assert "secret" in str(cres)
    assert isinstance(sres, ProtocolError)  # refused, one way or another
    assert MsgType.WELCOME not in sconn.sent_types and MsgType.MODEL not in sconn.sent_types
    assert sconn.key is None and cconn.key is None


def test_server_reports_missing_proof_as_auth_error(pair):
    """A client without the secret sends AUTH {"proof": None}; the server should classify this
    as an authentication failure (its own message says "wrong or missing secret"), not as a
    malformed message."""
    cconn, cres, sconn, sres = run_handshake(*pair, None, SECRET)
    assert isinstance(sres, AuthError), f"server raised {type(sres).__name__}: {sres}"


def test_client_with_secret_refuses_open_server(pair):
    cconn, cres, sconn, sres = run_handshake(*pair, SECRET, None)
    assert isinstance(cres, AuthError)
    assert "does not authenticate" in str(cres)
    assert cconn.sent_types == [MsgType.HELLO]  # never sent AUTH, never joined
    assert cconn.key is None
    assert not isinstance(sres, Peer)  # the server did not get a session either


@pytest.mark.parametrize("welcome_proof", [
    lambda client_proof: "00" * 32,  # a fake server that cannot prove the secret
    lambda client_proof: client_proof,  # one that reflects the client's own proof back
], ids=["bogus", "reflected"])
def test_client_refuses_server_that_cannot_prove_the_secret(pair, welcome_proof):
    c, s = pair

    def fake_server():
        conn = Connection(s)
        conn.recv(MsgType.HELLO, timeout=TIMEOUT)
        conn.send(MsgType.CHALLENGE, {"nonce": secrets.token_hex(32), "auth": True}, timeout=TIMEOUT)
        auth = conn.recv(MsgType.AUTH, timeout=TIMEOUT)
        conn.send(MsgType.WELCOME, {"proof": welcome_proof(auth.body["proof"])}, timeout=TIMEOUT)
        return auth.body["proof"]

    w = Worker(fake_server)
    cconn = Connection(c)
    with pytest.raises(AuthError, match="server failed"):
        client_handshake(cconn, 1, 10, {}, SECRET, timeout=TIMEOUT)
    assert isinstance(w.get(), str)
    assert cconn.send_key is None and cconn.recv_key is None


# --- man in the middle ------------------------------------------------------------------

def run_mitm(secret, tamper_hello=None, tamper_challenge=None, client_id=5):
    """client <-> mitm <-> server; the mitm relays each handshake frame, optionally edited."""
    c, m1 = socket.socketpair()
    m2, s = socket.socketpair()
    socks = (c, m1, m2, s)

    def relay():
        try:
            return relay_frames()
        except BaseException:
            m1.close()  # a real relay drops both legs when one fails
            m2.close()
            raise

    def relay_frames():
        to_client, to_server = Connection(m1), Connection(m2)
        hello = to_client.recv(MsgType.HELLO, timeout=TIMEOUT)
        raw = bytes(hello.raw)
        if tamper_hello:
            body = dict(hello.body)
            tamper_hello(body)
            raw = encode_body(MsgType.HELLO, body)
        to_server.send_payload(MsgType.HELLO, raw, timeout=TIMEOUT)
        challenge = to_server.recv(MsgType.CHALLENGE, timeout=TIMEOUT)
        raw = bytes(challenge.raw)
        if tamper_challenge:
            body = dict(challenge.body)
            tamper_challenge(body)
            raw = encode_body(MsgType.CHALLENGE, body)
        to_client.send_payload(MsgType.CHALLENGE, raw, timeout=TIMEOUT)
        auth = to_client.recv(MsgType.AUTH, timeout=TIMEOUT)
        to_server.send_payload(MsgType.AUTH, bytes(auth.raw), timeout=TIMEOUT)
        reply = to_server.recv((MsgType.WELCOME, MsgType.ERROR), timeout=TIMEOUT)
        to_client.send_payload(reply.type, bytes(reply.raw), timeout=TIMEOUT)
        return reply.type

    w = Worker(relay)
    try:
        cconn, cres, sconn, sres = run_handshake(c, s, secret, secret, client_id=client_id)
        relayed = w.outcome()
    finally:
        for x in socks:
            x.close()
    return cconn, cres, sconn, sres, relayed


def test_transparent_mitm_relay_does_not_break_handshake():
    cconn, cres, sconn, sres, relayed = run_mitm(SECRET)
    assert cres is None
    assert isinstance(sres, Peer) and sres.client_id == 5
    assert relayed == MsgType.WELCOME
    assert cconn.send_key == sconn.recv_key is not None


@pytest.mark.parametrize("edit", [
    lambda b: b.__setitem__("client_id", 999),
    lambda b: b.__setitem__("num_samples", 10**6),
    lambda b: b.__setitem__("options", {"quantization": True}),
])
def test_tampered_hello_fails_authentication(edit):
    cconn, cres, sconn, sres, relayed = run_mitm(SECRET, tamper_hello=edit)
    assert isinstance(sres, AuthError)
    assert isinstance(cres, (RemoteError, AuthError))
    assert relayed == MsgType.ERROR
    assert MsgType.WELCOME not in sconn.sent_types
    assert cconn.key is None and sconn.key is None


def test_tampered_challenge_nonce_fails_authentication():
    cconn, cres, sconn, sres, _ = run_mitm(
        SECRET, tamper_challenge=lambda b: b.__setitem__("nonce", "00" * 32))
    assert isinstance(sres, AuthError)
    assert isinstance(cres, (RemoteError, AuthError))
    assert cconn.key is None and sconn.key is None


def test_downgrade_to_no_auth_is_refused_by_client_with_secret():
    cconn, cres, sconn, sres, _ = run_mitm(
        SECRET, tamper_challenge=lambda b: b.__setitem__("auth", False))
    assert isinstance(cres, AuthError)
    assert not isinstance(sres, Peer)
    assert cconn.key is None and sconn.key is None


# --- server input validation ------------------------------------------------------------

NONCE = "ab" * 32


@pytest.mark.parametrize("hello", [
    {"client_id": -1, "num_samples": 5, "options": {}, "nonce": NONCE},
    {"client_id": 1_000_000, "num_samples": 5, "options": {}, "nonce": NONCE},
    {"client_id": True, "num_samples": 5, "options": {}, "nonce": NONCE},
    {"client_id": 1, "num_samples": "5", "options": {}, "nonce": NONCE},
    {"client_id": 1, "num_samples": 5, "nonce": NONCE},
    {"client_id": 1, "num_samples": 5, "options": [1], "nonce": NONCE},
    {"client_id": 1, "num_samples": 5, "options": {"quantization": True, "evil": 1}, "nonce": NONCE},
    {"client_id": 1, "num_samples": 5, "options": {}, "nonce": NONCE[:-2]},
    {"client_id": 1, "num_samples": 5, "options": {}},
    {"client_id": 1, "num_samples": 5, "options": {}, "nonce": NONCE, "admin": True},
])
def test_server_rejects_bad_hello(pair, hello):
    c, s = pair
    Connection(c).send_payload(MsgType.HELLO, json.dumps(hello).encode(), timeout=TIMEOUT)
    sconn = RecordingConnection(s)
    with pytest.raises(ProtocolError):
        server_handshake(sconn, None, timeout=TIMEOUT)
    assert sconn.sent_types == []


def test_server_rejects_oversized_hello(pair):
    c, s = pair
    body = {"client_id": 1, "num_samples": 5, "options": {"pad": "x" * (HANDSHAKE_MAX_FRAME + 1)}}
    w = Worker(Connection(c).send_payload, MsgType.HELLO, json.dumps(body).encode(), TIMEOUT)
    with pytest.raises(ProtocolError, match="exceeds"):
        server_handshake(Connection(s), None, timeout=TIMEOUT)
    s.close()
    w.outcome()


def _torch_saved_pickle(pkl: bytes) -> bytes:
    import io
    buf = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buf, True, 64)
    writer.write_record("data.pkl", pkl, len(pkl))
    writer.write_end_of_file()
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["bytearray-1GiB", "counter-2e8", "deflate", "hostile-pickle"])
def test_hostile_torch_hello_is_refused_before_torch_load(pair, monkeypatch, kind):
    """The observed attacks on HELLO (checked before the secret): bytearray(1 GiB) in 455
    bytes, Counter(bytearray(2e8)) in 477, a DEFLATE bomb. A HELLO is JSON now."""
    import io
    import zipfile

    payloads = {
        "bytearray-1GiB": _torch_saved_pickle(b"\x80\x02}X\x01\x00\x00\x00xcbuiltins\nbytearray\n"
                                              b"J\x00\x00\x00@\x85Rs."),
        "counter-2e8": _torch_saved_pickle(b"\x80\x02}X\x01\x00\x00\x00xccollections\nCounter\n"
                                           b"cbuiltins\nbytearray\nJ\x00\xc2\xeb\x0b\x85R\x85Rs."),
        "hostile-pickle": encode_payload({"client_id": 1, "x": "\x1b[31m"}),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02]q\x00(" + b"N" * 3_000_000 + b"e.")
    payloads["deflate"] = buf.getvalue()
    raw = payloads[kind]
    assert len(raw) <= HANDSHAKE_MAX_FRAME

    def boom(*_args, **_kwargs):
        raise AssertionError("torch.load reached before authentication")

    monkeypatch.setattr(torch, "load", boom)
    c, s = pair
    Connection(c).send_payload(MsgType.HELLO, raw, timeout=TIMEOUT)
    sconn = RecordingConnection(s)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(ProtocolError, match="HELLO is not"):
            server_handshake(sconn, SECRET, timeout=TIMEOUT)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5 and peak < 1 << 20
    assert sconn.sent_types == []


def test_handshake_never_calls_torch_load(pair, monkeypatch):
    def boom(*_args, **_kwargs):
        raise AssertionError("torch.load in the handshake")

    monkeypatch.setattr(torch, "load", boom)
    cconn, cres, sconn, sres = run_handshake(*pair, SECRET, SECRET)
    assert cres is None and isinstance(sres, Peer)


def test_server_handshake_times_out_on_silent_client(pair):
    _, s = pair
    with pytest.raises(socket.timeout):
        server_handshake(Connection(s), SECRET, timeout=0.2)


# --- TLS --------------------------------------------------------------------------------

def _make_cert(directory: Path, name: str) -> tuple[str, str]:
    cert, key, _ = write_certificate(["127.0.0.1"], directory / name, days=1)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    return {"server": _make_cert(d, "server"), "other": _make_cert(d, "other")}


def tls_exchange(server_ctx, client_ctx, server_hostname="127.0.0.1", secret=None):
    """One TLS connection over real 127.0.0.1 TCP: (optional) handshake, then one frame each way."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve():
        raw, _ = srv.accept()
        raw.settimeout(TIMEOUT)
        try:
            with server_ctx.wrap_socket(raw, server_side=True) as tls:
                conn = Connection(tls)
                if secret is not None:
                    server_handshake(conn, secret, timeout=TIMEOUT)
                msg = conn.recv(MsgType.UPDATE, timeout=TIMEOUT)
                conn.send(MsgType.MODEL, {"echo": msg.body["t"] * 2}, timeout=TIMEOUT)
                return tls.version()
        finally:
            raw.close()

    w = Worker(serve)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.getpeercert()  # verified certificate present
                conn = Connection(tls)
                if secret is not None:
                    client_handshake(conn, 1, 10, {}, secret, timeout=TIMEOUT)
                    assert conn.key is not None
                t = torch.arange(6, dtype=torch.float32)
                conn.send(MsgType.UPDATE, {"t": t}, timeout=TIMEOUT)
                reply = conn.recv(MsgType.MODEL, timeout=TIMEOUT)
                assert torch.equal(reply.body["echo"], t * 2)
                client_version = tls.version()
        return client_version, w
    finally:
        srv.close()


def test_tls_context_settings(certs):
    cert, key = certs["server"]
    sctx = server_tls_context(cert, key)
    assert sctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    cctx = client_tls_context(cert)
    assert cctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert cctx.verify_mode == ssl.CERT_REQUIRED
    assert cctx.check_hostname is True


def test_tls_handshake_and_frame(certs):
    cert, key = certs["server"]
    version, w = tls_exchange(server_tls_context(cert, key), client_tls_context(cert))
    assert version in ("TLSv1.2", "TLSv1.3")
    assert w.get() == version


def test_tls_with_secret_handshake(certs):
    cert, key = certs["server"]
    version, w = tls_exchange(server_tls_context(cert, key), client_tls_context(cert), secret=SECRET)
    assert w.get() == version


def test_tls_client_with_other_ca_fails_verification(certs):
    cert, key = certs["server"]
    other_cert, _ = certs["other"]
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_exchange(server_tls_context(cert, key), client_tls_context(other_cert))


def test_tls_client_checks_hostname(certs):
    cert, key = certs["server"]
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_exchange(server_tls_context(cert, key), client_tls_context(cert), server_hostname="example.com")


def test_server_tls_context_rejects_mismatched_key(certs):
    cert, _ = certs["server"]
    _, other_key = certs["other"]
    with pytest.raises(ssl.SSLError):
        server_tls_context(cert, other_key)


# --- per-client secrets: nobody can take over another client's id ------------------------

ALICE, BOB = b"alice's own secret", b"bob's own secret"
RING = KeyRing(per_client={1: ALICE, 2: BOB})


def test_per_client_secrets_admit_each_client_with_its_own_secret(pair):
    cconn, cres, sconn, sres = run_handshake(*pair, BOB, RING, client_id=2)
    assert cres is None and isinstance(sres, Peer) and sres.client_id == 2
    sconn.send(MsgType.MODEL, {"round": 1}, timeout=TIMEOUT)
    assert cconn.recv(MsgType.MODEL, timeout=TIMEOUT).body == {"round": 1}


@pytest.mark.parametrize("client_id,secret", [(1, BOB), (3, BOB), (3, ALICE)],
                         ids=["bob-claims-alice", "bob-claims-unknown", "alice-claims-unknown"])
def test_id_takeover_with_per_client_secrets_is_refused(pair, client_id, secret):
    """With a shared secret any holder could claim any id (and the server replaces the
    session of a duplicate id). A clients file binds each id to its own secret."""
    cconn, cres, sconn, sres = run_handshake(*pair, secret, RING, client_id=client_id)
    assert isinstance(sres, AuthError) and f"client {client_id} failed" in str(sres)
    assert isinstance(cres, (RemoteError, AuthError)) and "authentication" in str(cres)
    assert MsgType.WELCOME not in sconn.sent_types
    assert sconn.key is None and cconn.key is None


def test_shared_secret_lets_any_holder_claim_any_id(pair):
    """The documented limit of a shared secret: what per-client secrets are for."""
    cconn, cres, sconn, sres = run_handshake(*pair, SECRET, KeyRing(shared=SECRET), client_id=1)
    assert cres is None and isinstance(sres, Peer) and sres.client_id == 1


def test_open_key_ring_is_an_open_server(pair):
    cconn, cres, sconn, sres = run_handshake(*pair, None, KeyRing())
    assert cres is None and isinstance(sres, Peer) and sconn.key is None


def test_reflected_frame_after_a_real_handshake_is_refused(pair):
    """Both directions used to share one key: the server's own MODEL frame, sent back to
    it by the client, passed the tag check."""
    c, s = pair
    cconn, cres, sconn, sres = run_handshake(c, s, SECRET, SECRET)
    assert cres is None and isinstance(sres, Peer)
    sconn.send(MsgType.MODEL, {"round": 1}, timeout=TIMEOUT)
    c.settimeout(TIMEOUT)
    c.sendall(c.recv(65536))  # the client reflects the frame, tag and all
    with pytest.raises(ProtocolError, match="authentication failed"):
        sconn.recv(MsgType.UPDATE, timeout=TIMEOUT)
