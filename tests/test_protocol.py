from __future__ import annotations

import io
import json
import os
import pickle
import random
import socket
import threading
import time
import tracemalloc

import pytest
import torch
from procs import Worker

from fl.learning.model import ImprovedCNN
from fl.wire import frames as protocol
from fl.wire.errors import ConnectionClosed, ProtocolError, RemoteError
from fl.wire.frames import (
    CONTROL_TYPES,
    DEFAULT_MAX_FRAME,
    FLAG_TAGGED,
    HANDSHAKE_MAX_FRAME,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MIB,
    RECV_STEP,
    TAG_SIZE,
    VERSION,
    Connection,
    Frame,
    MsgType,
    decode_header,
    decode_payload,
    encode_header,
    encode_payload,
    field,
    frame_tag,
    pack_frame,
    recv_exact,
)

KEY = bytes(range(32))


# --- helpers ----------------------------------------------------------------------------

def frame_bytes(msg_type: MsgType, body: dict, key: bytes | None = None, seq: int = 0) -> bytes:
    return b"".join(pack_frame(msg_type, encode_payload(body), key, seq))


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5.0)
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class TrickleSock:
    """A fake socket whose recv_into hands out at most ``chunk`` bytes per call."""

    def __init__(self, data: bytes, chunk: int = 1):
        self.data = data
        self.pos = 0
        self.chunk = chunk
        self.calls = 0

    def settimeout(self, _t):
        pass

    def recv_into(self, view, n):
        self.calls += 1
        k = min(self.chunk, n, len(self.data) - self.pos)
        view[:k] = self.data[self.pos:self.pos + k]
        self.pos += k
        return k


class Evil:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == a[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# --- header -----------------------------------------------------------------------------

def test_header_size_and_layout():
    assert HEADER_SIZE == 16
    h = encode_header(MsgType.UPDATE, 0x0102030405060708, FLAG_TAGGED)
    assert h[:4] == MAGIC
    assert h[4] == VERSION
    assert h[5] == int(MsgType.UPDATE)
    assert h[6:8] == b"\x00\x01"
    assert h[8:] == bytes([1, 2, 3, 4, 5, 6, 7, 8])


@pytest.mark.parametrize("msg_type", list(MsgType))
@pytest.mark.parametrize("flags", [0, FLAG_TAGGED])
def test_header_round_trip(msg_type, flags):
    h = encode_header(msg_type, 12345, flags)
    assert len(h) == HEADER_SIZE
    assert decode_header(h, max_size=12345) == (msg_type, flags, 12345)


def test_decode_header_only_reads_the_header_and_never_allocates_payload():
    # A huge (but permitted) length is decoded from 16 bytes without allocating anything.
    length = 1 << 62
    assert decode_header(encode_header(MsgType.MODEL, length), max_size=1 << 63) == (MsgType.MODEL, 0, length)


@pytest.mark.parametrize("size", [0, 15, 17])
def test_decode_header_wrong_size(size):
    h = (encode_header(MsgType.MODEL, 1) + b"\x00")[:size]
    with pytest.raises(ProtocolError, match="short header"):
        decode_header(h, 100)


def test_decode_header_bad_magic():
    h = HEADER.pack(b"HTTP", VERSION, int(MsgType.MODEL), 0, 5)
    with pytest.raises(ProtocolError, match="magic"):
        decode_header(h, 100)


@pytest.mark.parametrize("version", [0, VERSION + 1, 255])
def test_decode_header_wrong_version(version):
    h = HEADER.pack(MAGIC, version, int(MsgType.MODEL), 0, 5)
    with pytest.raises(ProtocolError, match="version"):
        decode_header(h, 100)


@pytest.mark.parametrize("raw_type", [0, max(MsgType) + 1, 200, 255])
def test_decode_header_unknown_type(raw_type):
    h = HEADER.pack(MAGIC, VERSION, raw_type, 0, 5)
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode_header(h, 100)


@pytest.mark.parametrize("flags", [0x2, 0x3, 0x8000, 0xFFFF])
def test_decode_header_unknown_flags(flags):
    h = HEADER.pack(MAGIC, VERSION, int(MsgType.MODEL), flags, 5)
    with pytest.raises(ProtocolError, match="flags"):
        decode_header(h, 100)


def test_decode_header_length_limit_is_inclusive():
    assert decode_header(encode_header(MsgType.MODEL, 100), 100)[2] == 100
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_header(encode_header(MsgType.MODEL, 101), 100)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_header(encode_header(MsgType.MODEL, 2**64 - 1), DEFAULT_MAX_FRAME)


# --- payload ----------------------------------------------------------------------------

def test_payload_round_trip_plain_values():
    body = {"round": 7, "lr": 0.01, "name": "x", "flag": True, "none": None,
            "list": [1, 2.5, "a"], "tuple": (1, 2), "nested": {"t": torch.arange(5)}}
    out = decode_payload(encode_payload(body))
    assert out["round"] == 7 and out["lr"] == 0.01 and out["name"] == "x"
    assert out["flag"] is True and out["none"] is None
    assert out["list"] == [1, 2.5, "a"] and tuple(out["tuple"]) == (1, 2)
    assert torch.equal(out["nested"]["t"], torch.arange(5))


def test_payload_values_messages_never_hold_are_refused():
    """bytes, sets, bytearrays ... pass torch.load's allowlist but not ours (safe_decode.py)."""
    for value in (b"\x00\xff", {1}, bytearray(2)):
        with pytest.raises(ProtocolError, match="not allowed"):
            decode_payload(encode_payload({"v": value}))


def test_decode_payload_accepts_bytearray_and_memoryview():
    raw = encode_payload({"a": torch.ones(2)})
    for view in (bytearray(raw), memoryview(raw)):
        assert torch.equal(decode_payload(view)["a"], torch.ones(2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_payload_random_bytes(seed):
    junk = random.Random(seed).randbytes(2000)
    with pytest.raises(ProtocolError, match="undecodable"):
        decode_payload(junk)


def test_decode_payload_empty_and_truncated():
    with pytest.raises(ProtocolError):
        decode_payload(b"")
    raw = encode_payload({"a": torch.ones(100)})
    with pytest.raises(ProtocolError):
        decode_payload(raw[: len(raw) // 2])


@pytest.mark.parametrize("value", [[1, 2, 3], torch.zeros(3), 5, "text", None])
def test_decode_payload_non_dict(value):
    buf = io.BytesIO()
    torch.save(value, buf)
    with pytest.raises(ProtocolError, match="expected a dict"):
        decode_payload(buf.getvalue())


def _hostile_payloads(cmd: str) -> dict[str, bytes]:
    zipped = io.BytesIO()
    torch.save({"state": Evil(cmd)}, zipped)
    bare = io.BytesIO()
    torch.save(Evil(cmd), bare)
    return {
        "torch.save-zip-in-dict": zipped.getvalue(),
        "torch.save-zip-bare": bare.getvalue(),
        "pickle-p2": pickle.dumps({"state": Evil(cmd)}, protocol=2),
        "pickle-p5": pickle.dumps(Evil(cmd), protocol=5),
        "pickle-p0": pickle.dumps(Evil(cmd), protocol=0),
    }


def test_hostile_pickle_control_is_really_hostile(tmp_path):
    """Sanity check for the test below: an unrestricted unpickler does run the command."""
    marker = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(Evil(f"touch {marker}")))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["torch.save-zip-in-dict", "torch.save-zip-bare", "pickle-p2", "pickle-p5", "pickle-p0"])
def test_decode_payload_refuses_hostile_pickle(tmp_path, kind):
    marker = tmp_path / "MARKER"
    raw = _hostile_payloads(f"touch {marker}")[kind]
    with pytest.raises(ProtocolError):
        decode_payload(raw)
    assert not marker.exists()


def test_recv_refuses_hostile_pickle_frame(pair, tmp_path):
    a, b = pair
    marker = tmp_path / "MARKER"
    raw = _hostile_payloads(f"touch {marker}")["torch.save-zip-in-dict"]
    Connection(a).send_payload(MsgType.UPDATE, raw, timeout=5)
    with pytest.raises(ProtocolError):
        Connection(b).recv(timeout=5)
    assert not marker.exists()


# --- frames over sockets ----------------------------------------------------------------

def test_frame_round_trip_dict_with_tensors(pair):
    a, b = pair
    body = {"round": 2, "w": torch.randn(3, 4), "i": torch.arange(6, dtype=torch.int64),
            "h": torch.randn(5).half(), "meta": {"acc": 0.5}}
    sender, receiver = Connection(a), Connection(b)
    n = sender.send(MsgType.UPDATE, body, timeout=5)
    msg = receiver.recv(MsgType.UPDATE, timeout=5)
    assert msg.type == MsgType.UPDATE
    assert msg.nbytes == n
    assert msg.body["round"] == 2 and msg.body["meta"] == {"acc": 0.5}
    for k in ("w", "i", "h"):
        assert msg.body[k].dtype == body[k].dtype
        assert torch.equal(msg.body[k], body[k])
    assert len(msg.raw) == n - HEADER_SIZE
    assert decode_payload(msg.raw).keys() == body.keys()


def test_frame_round_trip_real_model_state(pair):
    a, b = pair
    torch.manual_seed(0)
    model = ImprovedCNN()
    model.train()
    model(torch.randn(4, 1, 28, 28))  # non-default BN statistics
    state = model.state_dict()
    sender, receiver = Connection(a), Connection(b)
    w = Worker(sender.send, MsgType.MODEL, {"round": 1, "state": state, "config": {"lr": 0.1}}, 10)
    msg = receiver.recv(MsgType.MODEL, timeout=10)
    n = w.get()
    assert msg.nbytes == n == sender.bytes_sent == receiver.bytes_received
    assert n > 421_834 * 4  # the float32 weights really travelled
    assert_states_equal(state, msg.body["state"])
    fresh = ImprovedCNN()
    fresh.load_state_dict(msg.body["state"])  # strict: same key set


def test_recv_frame_lands_in_the_given_buffer_undecoded(pair):
    a, b = pair
    sender, receiver = Connection(a), Connection(b)
    sender.key = receiver.key = KEY  # tagged frames are checked before they are handed over
    body = {"round": 1, "t": torch.arange(1000, dtype=torch.float32)}
    buffer = bytearray(8 * 1024)
    n = sender.send(MsgType.UPDATE, body, timeout=5)
    frame = receiver.recv_frame(MsgType.UPDATE, timeout=5, buffer=buffer)
    assert frame.type == MsgType.UPDATE and frame.nbytes == n
    assert isinstance(frame.payload, memoryview) and frame.payload.obj is buffer  # no new allocation
    assert torch.equal(decode_payload(frame.payload)["t"], body["t"])
    sender.send(MsgType.UPDATE, {"t": torch.zeros(4000)}, timeout=5)  # larger than the buffer
    big = receiver.recv_frame(MsgType.UPDATE, timeout=5, buffer=buffer)
    assert isinstance(big.payload, bytearray) and decode_payload(big.payload)["t"].numel() == 4000


def test_recv_frame_checks_the_type_and_raises_remote_errors(pair):
    a, b = pair
    sender, receiver = Connection(a), Connection(b)
    sender.send(MsgType.MODEL, {"round": 1}, timeout=5)
    with pytest.raises(ProtocolError, match="unexpected MODEL"):
        receiver.recv_frame(MsgType.UPDATE, timeout=5)
    sender.send_error("no more rounds for you")
    with pytest.raises(RemoteError, match="no more rounds for you"):
        receiver.recv_frame(MsgType.UPDATE, timeout=5)


def test_several_frames_in_sequence(pair):
    a, b = pair
    sender, receiver = Connection(a), Connection(b)
    for i in range(5):
        sender.send(MsgType.UPDATE, {"i": i}, timeout=5)
    assert [receiver.recv(timeout=5).body["i"] for _ in range(5)] == list(range(5))
    assert sender.send_seq == receiver.recv_seq == 5


def test_partial_recvs_one_byte_at_a_time_thread(pair):
    a, b = pair
    body = {"round": 3, "t": torch.arange(50, dtype=torch.float32)}
    data = frame_bytes(MsgType.MODEL, body)

    def dribble():
        for i in range(len(data)):
            a.sendall(data[i:i + 1])

    w = Worker(dribble)
    msg = Connection(b).recv(MsgType.MODEL, timeout=10)
    w.get()
    assert msg.body["round"] == 3
    assert torch.equal(msg.body["t"], body["t"])
    assert msg.nbytes == len(data)


@pytest.mark.parametrize("chunk", [3, 7])
def test_partial_recvs_few_bytes_at_a_time_thread(pair, chunk):
    a, b = pair
    body = {"t": torch.randn(300)}
    data = frame_bytes(MsgType.UPDATE, body)

    def dribble():
        for i in range(0, len(data), chunk):
            a.sendall(data[i:i + chunk])

    w = Worker(dribble)
    msg = Connection(b).recv(MsgType.UPDATE, timeout=10)
    w.get()
    assert torch.equal(msg.body["t"], body["t"])


@pytest.mark.parametrize("chunk", [1, 5])
def test_partial_recvs_deterministic_fake_socket(chunk):
    body = {"t": torch.randn(40), "k": "v"}
    for key in (None, KEY):
        data = frame_bytes(MsgType.UPDATE, body, key=key)
        sock = TrickleSock(data, chunk)
        conn = Connection(sock)  # type: ignore[arg-type]
        conn.key = key
        msg = conn.recv(MsgType.UPDATE, timeout=5)
        assert torch.equal(msg.body["t"], body["t"]) and msg.body["k"] == "v"
        assert sock.pos == len(data)
        assert sock.calls >= len(data) // chunk  # really read in pieces


def test_recv_exact_reads_exact_count_and_leaves_rest():
    sock = TrickleSock(b"abcdefghij", chunk=3)
    assert bytes(recv_exact(sock, 4)) == b"abcd"  # type: ignore[arg-type]
    assert bytes(recv_exact(sock, 6)) == b"efghij"  # type: ignore[arg-type]
    with pytest.raises(ConnectionClosed):
        recv_exact(sock, 1)  # type: ignore[arg-type]


def test_clean_close_before_frame_raises_connection_closed(pair):
    a, b = pair
    a.close()
    with pytest.raises(ConnectionClosed):
        Connection(b).recv(timeout=5)


@pytest.mark.parametrize("cut", ["header", "payload", "tag"])
def test_truncated_frame_raises_connection_closed_promptly(pair, cut):
    a, b = pair
    key = KEY if cut == "tag" else None
    data = frame_bytes(MsgType.MODEL, {"t": torch.randn(200)}, key=key)
    upto = {"header": HEADER_SIZE // 2,
            "payload": HEADER_SIZE + (len(data) - HEADER_SIZE) // 2,
            "tag": len(data) - TAG_SIZE // 2}[cut]
    a.sendall(data[:upto])
    a.close()
    conn = Connection(b)
    conn.key = key
    t0 = time.monotonic()
    with pytest.raises(ConnectionClosed):
        conn.recv(timeout=5)
    assert time.monotonic() - t0 < 3.0  # promptly, not after the 5 s timeout


def test_oversized_frame_refused_before_payload_is_read(pair, monkeypatch):
    a, b = pair
    reads: list[int] = []
    real = protocol.recv_exact

    def spy(sock, n, deadline=None):
        reads.append(n)
        return real(sock, n, deadline)

    monkeypatch.setattr(protocol, "recv_exact", spy)
    a.sendall(encode_header(MsgType.UPDATE, 2 * 1024**3))  # claims 2 GiB, sends nothing more
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match="exceeds"):
        Connection(b).recv(timeout=5)
    assert time.monotonic() - t0 < 3.0  # refused immediately, did not wait for the payload
    assert reads == [HEADER_SIZE]


def test_connection_max_frame_and_max_size_override(pair):
    a, b = pair
    payload = encode_payload({"t": torch.zeros(100)})
    sender = Connection(a)
    receiver = Connection(b, max_frame=len(payload))
    sender.send_payload(MsgType.UPDATE, payload, timeout=5)
    assert receiver.recv(timeout=5).type == MsgType.UPDATE  # exactly at the limit: fine
    sender.send_payload(MsgType.UPDATE, payload, timeout=5)
    with pytest.raises(ProtocolError, match="exceeds"):
        receiver.recv(timeout=5, max_size=len(payload) - 1)


def test_handshake_limit_refuses_large_frame(pair):
    a, b = pair
    a.sendall(encode_header(MsgType.HELLO, HANDSHAKE_MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        Connection(b).recv(MsgType.HELLO, timeout=5, max_size=HANDSHAKE_MAX_FRAME)


def test_garbage_stream_refused(pair):
    a, b = pair
    a.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ProtocolError, match="magic"):
        Connection(b).recv(timeout=5)


# --- deadlines --------------------------------------------------------------------------

def test_half_header_then_silence_times_out(pair):
    a, b = pair
    a.sendall(encode_header(MsgType.MODEL, 10)[:8])
    t0 = time.monotonic()
    with pytest.raises(socket.timeout):
        Connection(b).recv(timeout=0.3)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 3.0


def test_no_bytes_at_all_times_out(pair):
    _, b = pair
    t0 = time.monotonic()
    with pytest.raises(socket.timeout):
        Connection(b).recv(timeout=0.2)
    assert time.monotonic() - t0 < 3.0  # promptly, not after the 5 s timeout


@pytest.mark.parametrize("header_first", [False, True])
def test_dribbling_peer_cannot_extend_overall_timeout(pair, header_first):
    a, b = pair
    data = frame_bytes(MsgType.MODEL, {"t": torch.randn(100)})
    stop = threading.Event()
    sent = [0]

    def dribble():
        i = 0
        if header_first:
            a.sendall(data[:HEADER_SIZE])
            i = HEADER_SIZE
        while not stop.is_set() and i < len(data):
            a.sendall(data[i:i + 1])
            i += 1
            sent[0] = i
            stop.wait(0.1)

    w = Worker(dribble)
    t0 = time.monotonic()
    try:
        with pytest.raises(socket.timeout):
            Connection(b).recv(timeout=0.5)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        w.get()
    assert elapsed < 3.0  # bounded by the 0.5 s deadline, not by the dribble (minutes)
    assert sent[0] >= 3  # the peer really did keep sending bytes during the wait


def test_timeout_does_not_break_normal_frames(pair):
    a, b = pair
    Connection(a).send(MsgType.DONE, {"reason": "ok"}, timeout=1)
    assert Connection(b).recv(MsgType.DONE, timeout=1).body == {"reason": "ok"}


# --- HMAC-tagged frames -----------------------------------------------------------------

def keyed(sock, key=KEY):
    c = Connection(sock)
    c.key = key
    return c


def test_tagged_frames_round_trip(pair):
    a, b = pair
    sender, receiver = keyed(a), keyed(b)
    for i in range(3):
        n = sender.send(MsgType.UPDATE, {"i": i, "t": torch.full((4,), float(i))}, timeout=5)
        msg = receiver.recv(MsgType.UPDATE, timeout=5)
        assert msg.body["i"] == i and torch.equal(msg.body["t"], torch.full((4,), float(i)))
        assert msg.nbytes == n
    assert sender.send_seq == receiver.recv_seq == 3


def test_tagged_frame_layout():
    payload = encode_payload({"x": 1})
    parts = pack_frame(MsgType.UPDATE, payload, KEY, seq=5)
    assert len(parts) == 3
    header, body, tag = parts
    assert decode_header(header, 10**6) == (MsgType.UPDATE, FLAG_TAGGED, len(payload))
    assert body == payload
    assert len(tag) == TAG_SIZE == 32
    assert tag == frame_tag(KEY, 5, header, payload)
    assert tag != frame_tag(KEY, 6, header, payload)
    assert pack_frame(MsgType.UPDATE, payload) == [encode_header(MsgType.UPDATE, len(payload)), payload]


def test_flipped_payload_byte_is_refused(pair):
    a, b = pair
    data = bytearray(frame_bytes(MsgType.UPDATE, {"t": torch.ones(10)}, key=KEY, seq=0))
    data[HEADER_SIZE + 40] ^= 0x01
    a.sendall(bytes(data))
    with pytest.raises(ProtocolError, match="authentication"):
        keyed(b).recv(timeout=5)


def test_flipped_tag_byte_is_refused(pair):
    a, b = pair
    data = bytearray(frame_bytes(MsgType.UPDATE, {"t": torch.ones(10)}, key=KEY, seq=0))
    data[-1] ^= 0x80
    a.sendall(bytes(data))
    with pytest.raises(ProtocolError, match="authentication"):
        keyed(b).recv(timeout=5)


def test_changed_message_type_in_header_is_refused(pair):
    a, b = pair
    data = bytearray(frame_bytes(MsgType.UPDATE, {"x": 1}, key=KEY, seq=0))
    data[5] = int(MsgType.DONE)
    a.sendall(bytes(data))
    with pytest.raises(ProtocolError, match="authentication"):
        keyed(b).recv(timeout=5)


def test_wrong_key_is_refused(pair):
    a, b = pair
    keyed(a, KEY).send(MsgType.UPDATE, {"x": 1}, timeout=5)
    with pytest.raises(ProtocolError, match="authentication"):
        keyed(b, bytes(32)).recv(timeout=5)


def test_replayed_frame_is_refused(pair):
    a, b = pair
    data = frame_bytes(MsgType.UPDATE, {"x": 1}, key=KEY, seq=0)
    a.sendall(data + data)
    receiver = keyed(b)
    assert receiver.recv(MsgType.UPDATE, timeout=5).body == {"x": 1}
    with pytest.raises(ProtocolError, match="authentication"):
        receiver.recv(MsgType.UPDATE, timeout=5)


def test_reordered_frames_are_refused(pair):
    a, b = pair
    f0 = frame_bytes(MsgType.UPDATE, {"x": 0}, key=KEY, seq=0)
    f1 = frame_bytes(MsgType.UPDATE, {"x": 1}, key=KEY, seq=1)
    a.sendall(f1 + f0)
    with pytest.raises(ProtocolError, match="authentication"):
        keyed(b).recv(timeout=5)


def test_tagged_frame_to_untagged_receiver_is_refused(pair):
    a, b = pair
    keyed(a).send(MsgType.UPDATE, {"x": 1}, timeout=5)
    with pytest.raises(ProtocolError, match="authentication flag"):
        Connection(b).recv(timeout=5)


def test_untagged_frame_to_tagged_receiver_is_refused(pair):
    a, b = pair
    Connection(a).send(MsgType.UPDATE, {"x": 1}, timeout=5)
    with pytest.raises(ProtocolError, match="authentication flag"):
        keyed(b).recv(timeout=5)


# --- counters, errors, expectations -----------------------------------------------------

@pytest.mark.parametrize("key", [None, KEY])
def test_byte_counters_match_bytes_on_the_wire(pair, key):
    a, b = pair
    sender = Connection(a)
    sender.key = key
    bodies = [{"i": 1}, {"t": torch.randn(1000)}, {"reason": "x" * 50}]
    returned = [sender.send(MsgType.UPDATE, body, timeout=5) for body in bodies]
    a.shutdown(socket.SHUT_WR)
    wire = read_all(b)
    assert sender.bytes_sent == sum(returned) == len(wire)
    expected = sum(HEADER_SIZE + len(encode_payload(body)) + (TAG_SIZE if key else 0) for body in bodies)
    assert len(wire) == expected

    # and the receiving side counts the same bytes
    c, d = socket.socketpair()
    try:
        c.sendall(wire)
        receiver = Connection(d)
        receiver.key = key
        sizes = [receiver.recv(timeout=5).nbytes for _ in bodies]
        assert sizes == returned
        assert receiver.bytes_received == len(wire)
    finally:
        c.close()
        d.close()


def test_error_frame_raises_remote_error_with_reason(pair):
    a, b = pair
    Connection(a).send_error("server is shutting down")
    with pytest.raises(RemoteError, match="server is shutting down"):
        Connection(b).recv(MsgType.MODEL, timeout=5)


def test_error_frame_without_reason(pair):
    a, b = pair
    Connection(a).send(MsgType.ERROR, {}, timeout=5)
    with pytest.raises(RemoteError, match="unspecified"):
        Connection(b).recv(MsgType.UPDATE, timeout=5)


def test_error_frame_returned_when_anything_is_accepted(pair):
    a, b = pair
    Connection(a).send_error("why")
    msg = Connection(b).recv(timeout=5)  # expect=None accepts every type, ERROR included
    assert msg.type == MsgType.ERROR and msg.body["reason"] == "why"


def test_error_frame_returned_when_expected(pair):
    a, b = pair
    Connection(a).send_error("bye")
    msg = Connection(b).recv(MsgType.ERROR, timeout=5)
    assert msg.type == MsgType.ERROR and msg.body == {"reason": "bye"}


def test_remote_error_reason_is_truncated(pair):
    a, b = pair
    Connection(a).send_error("z" * 5000)
    with pytest.raises(RemoteError) as info:
        Connection(b).recv(MsgType.MODEL, timeout=5)
    assert 0 < len(str(info.value)) <= 300


def test_send_error_never_raises_on_closed_socket(pair):
    a, b = pair
    conn = Connection(a)
    b.close()
    a.close()
    conn.send_error("nobody listens")  # must not raise


def test_unexpected_message_type(pair):
    a, b = pair
    sender, receiver = Connection(a), Connection(b)
    sender.send(MsgType.DONE, {"reason": "x"}, timeout=5)
    with pytest.raises(ProtocolError, match="unexpected DONE"):
        receiver.recv(MsgType.UPDATE, timeout=5)
    sender.send(MsgType.DONE, {"reason": "y"}, timeout=5)
    assert receiver.recv([MsgType.UPDATE, MsgType.DONE], timeout=5).type == MsgType.DONE


def test_field_returns_typed_values():
    body = {"n": 3, "s": "x", "b": True, "f": 1.5, "d": {}, "raw": b"ab"}
    assert field(body, "n", int) == 3
    assert field(body, "s", str) == "x"
    assert field(body, "b", bool) is True
    assert field(body, "f", (int, float)) == 1.5
    assert field(body, "d", dict) == {}
    assert field(body, "raw", bytes) == b"ab"
    assert field(body, "b", (int, bool)) is True


def test_field_missing():
    with pytest.raises(ProtocolError, match="lacks"):
        field({}, "n", int)


@pytest.mark.parametrize("value", [True, False])
def test_field_bool_is_not_an_int(value):
    with pytest.raises(ProtocolError, match="bool"):
        field({"n": value}, "n", int)
    with pytest.raises(ProtocolError, match="bool"):
        field({"n": value}, "n", (int, float))


@pytest.mark.parametrize("value,kind", [("3", int), (3.0, int), (None, bytes), (1, bool), ([], dict), (3, str)])
def test_field_wrong_type(value, kind):
    with pytest.raises(ProtocolError, match="has type"):
        field({"x": value}, "x", kind)


# --- control messages: bounded JSON, never torch.load -------------------------------------

HELLO = {"client_id": 1, "num_samples": 10, "options": {"quantization": False}, "nonce": "00" * 32}


def test_control_types_are_the_handshake_done_and_error():
    assert CONTROL_TYPES == {MsgType.HELLO, MsgType.CHALLENGE, MsgType.AUTH, MsgType.WELCOME,
                             MsgType.DONE, MsgType.ERROR}


def test_control_messages_travel_as_json(pair):
    a, b = pair
    sender, receiver = Connection(a), Connection(b)
    sender.send(MsgType.HELLO, HELLO, timeout=5)
    msg = receiver.recv(MsgType.HELLO, timeout=5)
    assert msg.body == HELLO and json.loads(bytes(msg.raw)) == HELLO
    sender.send(MsgType.DONE, {"reason": "federation finished"}, timeout=5)
    assert receiver.recv(MsgType.DONE, timeout=5).body == {"reason": "federation finished"}


def test_control_frames_never_reach_torch_load(pair, monkeypatch):
    """The pre-authentication attacks: a 455-byte HELLO holding bytearray(1 GiB) and a
    Counter over 2e8 bytes. A HELLO is JSON now: torch.load is not even called."""
    a, b = pair

    def boom(*_args, **_kwargs):
        raise AssertionError("torch.load reached for a control message")

    hostile = []
    for pkl in (b"\x80\x02}X\x01\x00\x00\x00xcbuiltins\nbytearray\nJ\x00\x00\x00@\x85Rs.",
                b"\x80\x02}X\x01\x00\x00\x00xccollections\nCounter\ncbuiltins\nbytearray\n"
                b"J\x00\xc2\xeb\x0b\x85R\x85Rs."):
        buf = io.BytesIO()
        writer = torch._C.PyTorchFileWriter(buf, True, 64)
        writer.write_record("data.pkl", pkl, len(pkl))
        writer.write_end_of_file()
        hostile.append(buf.getvalue())
    monkeypatch.setattr(torch, "load", boom)
    receiver = Connection(b)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        for msg_type in (MsgType.HELLO, MsgType.AUTH, MsgType.ERROR):
            for raw in hostile:
                assert len(raw) < HANDSHAKE_MAX_FRAME
                Connection(a).send_payload(msg_type, raw, timeout=5)
                with pytest.raises(ProtocolError, match="JSON|ASCII"):
                    receiver.recv(timeout=5)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 1 << 20


@pytest.mark.parametrize("msg_type", sorted(CONTROL_TYPES))
def test_control_frames_are_bounded_whatever_max_size_says(pair, msg_type):
    a, b = pair
    a.sendall(encode_header(msg_type, HANDSHAKE_MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        Connection(b, max_frame=DEFAULT_MAX_FRAME).recv(timeout=5)


def test_error_reason_with_escape_codes_is_sanitized(pair):
    a, b = pair
    evil = "\x1b[2J\x1b[1;31mpwned\r\n12:00:00 INFO    server: round 9: accuracy 100%\u202e"
    Connection(a).send_payload(MsgType.ERROR, json.dumps({"reason": evil}).encode(), timeout=5)
    with pytest.raises(RemoteError) as info:
        Connection(b).recv(MsgType.MODEL, timeout=5)
    text = str(info.value)
    assert text.isprintable() and "\x1b" not in text and "\n" not in text and "\r" not in text
    assert text.startswith("\\x1b[2J\\x1b[1;31mpwned\\r\\n12:00:00")


def test_nested_error_reason_is_a_protocol_error_not_a_recursion_error(pair):
    a, b = pair
    raw = b'{"reason": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    Connection(a).send_payload(MsgType.ERROR, raw[:HANDSHAKE_MAX_FRAME], timeout=5)
    with pytest.raises(ProtocolError, match="nested") as info:
        Connection(b).recv(MsgType.MODEL, timeout=5)
    assert not isinstance(info.value, RemoteError)


def test_error_and_done_after_authentication_are_tagged(pair):
    a, b = pair
    sender, receiver = keyed(a), keyed(b)
    sender.send_error("bye")
    with pytest.raises(RemoteError, match="bye"):
        receiver.recv(MsgType.MODEL, timeout=5)
    sender.send(MsgType.DONE, {"reason": "done"}, timeout=5)
    assert receiver.recv(MsgType.DONE, timeout=5).body == {"reason": "done"}


def test_refused_payload_is_not_kept_by_the_exception(pair):
    a, b = pair
    Connection(a).send_payload(MsgType.UPDATE, encode_payload({"t": torch.zeros(3, requires_grad=True)})
                               .replace(b"\x89", b"\x88"), timeout=5)  # requires_grad True again
    with pytest.raises(ProtocolError) as info:
        Connection(b).recv(MsgType.UPDATE, timeout=5)
    frames = []
    tb = info.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in frames:
        assert not any(isinstance(v, (bytearray, memoryview, Frame)) for v in frame.f_locals.values()), frame


# --- receive buffers grow with the bytes that arrive --------------------------------------

def test_announced_length_is_not_allocated_up_front(pair):
    """Sixteen 16-byte headers announcing 64 MiB each made the server allocate 1 GiB."""
    a, b = pair
    tracemalloc.start()
    try:
        for _ in range(16):
            c, d = socket.socketpair()
            try:
                c.sendall(encode_header(MsgType.UPDATE, 64 * MIB) + b"x" * 100)
                c.close()
                with pytest.raises(ConnectionClosed, match="after 100 of"):
                    Connection(d, max_frame=64 * MIB).recv_frame(MsgType.UPDATE, timeout=5)
            finally:
                c.close()
                d.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * RECV_STEP, peak


def test_growing_buffer_receives_large_frames_exactly(pair):
    a, b = pair
    body = {"t": torch.randn((3 * RECV_STEP + 12345) // 4)}
    data = frame_bytes(MsgType.UPDATE, body, key=KEY)

    def dribble():
        for i in range(0, len(data), 300_001):
            a.sendall(data[i:i + 300_001])

    w = Worker(dribble)
    frame = keyed(b).recv_frame(MsgType.UPDATE, timeout=30)
    w.get()
    assert isinstance(frame.payload, bytearray) and len(frame.payload) == len(data) - HEADER_SIZE - TAG_SIZE
    assert torch.equal(decode_payload(frame.payload)["t"], body["t"])


def test_recv_exact_grows_in_steps():
    data = bytes(range(256)) * ((RECV_STEP * 2 + 1000) // 256)
    sock = TrickleSock(data, chunk=RECV_STEP // 3 + 7)
    out = recv_exact(sock, len(data))  # type: ignore[arg-type]
    assert bytes(out) == data and len(out) == len(data)


def test_recv_exact_refuses_a_short_buffer():
    with pytest.raises(ValueError):
        recv_exact(TrickleSock(b"abcdef"), 6, into=bytearray(3))  # type: ignore[arg-type]


def test_default_limits_fit_this_model():
    state = ImprovedCNN().state_dict()
    assert len(encode_payload({"state": state})) * 4 < DEFAULT_MAX_FRAME <= 16 * MIB
    assert HANDSHAKE_MAX_FRAME <= 8 * 1024


# --- per-direction keys -------------------------------------------------------------------

C2S, S2C = bytes(range(32)), bytes(range(1, 33))


def test_reflected_frame_fails_the_tag_check(pair):
    """Both directions used to share one key and numbering: a peer's own frame, sent back
    to it, passed. With a key per direction it does not."""
    a, b = pair
    server, client = Connection(a), Connection(b)
    server.set_keys(send=S2C, recv=C2S)
    client.set_keys(send=C2S, recv=S2C)
    server.send(MsgType.MODEL, {"round": 1}, timeout=5)
    b.settimeout(5)
    wire = b.recv(65536)  # the client-side attacker captures the server's MODEL frame ...
    b.sendall(wire)  # ... and reflects it, seq 0 and all
    with pytest.raises(ProtocolError, match="authentication failed"):
        server.recv(timeout=5)


def test_per_direction_keys_round_trip(pair):
    a, b = pair
    server, client = Connection(a), Connection(b)
    server.set_keys(send=S2C, recv=C2S)
    client.set_keys(send=C2S, recv=S2C)
    assert server.authenticated and client.authenticated
    for i in range(3):
        server.send(MsgType.MODEL, {"round": i}, timeout=5)
        assert client.recv(MsgType.MODEL, timeout=5).body == {"round": i}
        client.send(MsgType.UPDATE, {"round": i}, timeout=5)
        assert server.recv(MsgType.UPDATE, timeout=5).body == {"round": i}
    assert server.send_seq == server.recv_seq == client.send_seq == client.recv_seq == 3


def test_key_property_sets_both_directions(pair):
    conn = Connection(pair[0])
    assert conn.key is None and not conn.authenticated
    conn.key = KEY
    assert conn.send_key == conn.recv_key == KEY == conn.key


# --- honest messages over a socket --------------------------------------------------------

def test_honest_update_and_done_over_a_socket(pair):
    from updates import update_message

    a, b = pair
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in ImprovedCNN().state_dict().items()}
    local = {k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()}
    sender, receiver = keyed(a), keyed(b)
    for quantization in (False, True):
        body = update_message(local, base, 1, 600, {"loss": 1.0}, quantization=quantization)
        w = Worker(sender.send, MsgType.UPDATE, body, 10)
        msg = receiver.recv(MsgType.UPDATE, timeout=10)
        w.get()
        assert msg.body["quantized"] is quantization and msg.body["num_samples"] == 600
    sender.send(MsgType.DONE, {"reason": "federation finished after 3 rounds"}, timeout=5)
    assert receiver.recv(MsgType.DONE, timeout=5).body["reason"] == "federation finished after 3 rounds"
