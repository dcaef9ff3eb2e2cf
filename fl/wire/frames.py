"""Wire protocol: length-prefixed frames; control messages are bounded JSON, model
messages ``torch.save`` bytes.

Frame layout (network byte order)::

    magic "FLMN" | version u8 | type u8 | flags u16 | payload length u64 | payload | [tag]

The 16-byte header is checked (magic, version, type, length <= limit) before a single
payload byte is allocated, and a payload's buffer then grows only as its bytes arrive.
The handshake messages, DONE and ERROR are small schema-checked JSON (``control.py``), so
nothing a peer sends before authenticating reaches ``torch.load``; MODEL and UPDATE
payloads pass an allowlist of their own before and after ``torch.load(weights_only=True)``
(``safe_decode.py``). After an authenticated handshake every frame carries a 32-byte
HMAC-SHA256 tag, under a key of its direction, over a per-direction sequence number, the
header and the payload, so tampered, replayed, reordered or reflected frames are refused.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import select
import socket
import ssl
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Iterable

import torch

from fl.common.layout import Layout
from fl.common.logs import sanitize
from fl.wire import safe_decode
from fl.wire.control import CONTROL_MAX_FRAME, REASON_LIMIT, decode_control, encode_control
from fl.wire.errors import ConnectionClosed, ProtocolError, RemoteError
from fl.wire.safe_decode import STRICT, Limits

MAGIC = b"FLMN"
VERSION = 2  # 2: JSON control messages, per-direction session keys
HEADER = struct.Struct("!4sBBHQ")
HEADER_SIZE = HEADER.size
TAG_SIZE = 32
FLAG_TAGGED = 0x1
MIB = 1 << 20
# The float32 ImprovedCNN is 1.7 MB on the wire (its 8-bit update 0.45 MB): 8 MiB is
# ~5x headroom and still refuses absurd lengths before anything is allocated. A larger
# model's frames may be twice its float32 state (``frame_limit``).
DEFAULT_MAX_FRAME = 8 * MIB
# Control messages (everything before authentication, DONE, ERROR) are JSON of < 2 KB.
HANDSHAKE_MAX_FRAME = CONTROL_MAX_FRAME
# A payload's buffer grows by this much as its bytes arrive, so a header that announces a
# large frame costs at most this much memory until the peer really sends the bytes.
RECV_STEP = MIB


class MsgType(IntEnum):
    HELLO = 1  # client -> server: who I am, how many samples, options, nonce
    CHALLENGE = 2  # server -> client: server nonce, whether a secret is required
    AUTH = 3  # client -> server: HMAC proof over the handshake transcript
    WELCOME = 4  # server -> client: server's proof; the session starts
    MODEL = 5  # server -> client: round, global state, training config
    UPDATE = 6  # client -> server: new state or quantized delta, samples, metrics
    DONE = 7  # server -> client: federation finished (or server stopping)
    ERROR = 8  # either way: a one-line reason, then the sender closes
    SECAGG = 9  # either way: one stage of secure aggregation (fl/secagg/wire.py), when the server requires it


# These are bounded JSON (control.py); the rest are torch.save payloads (safe_decode.py).
CONTROL_TYPES = frozenset({MsgType.HELLO, MsgType.CHALLENGE, MsgType.AUTH, MsgType.WELCOME,
                           MsgType.DONE, MsgType.ERROR})


@dataclass(frozen=True)
class Frame:
    type: MsgType
    payload: bytearray | memoryview  # as received, not decoded
    nbytes: int  # frame bytes on the wire, header and tag included


@dataclass(frozen=True)
class Message:
    type: MsgType
    body: dict[str, Any]
    nbytes: int  # frame bytes on the wire, header and tag included
    raw: bytes | bytearray | memoryview  # the payload as received (handshake transcripts hash it)


# --- pure framing functions -------------------------------------------------------------

def encode_header(msg_type: MsgType, length: int, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, int(msg_type), flags, length)


def decode_header(header: bytes, max_size: int) -> tuple[MsgType, int, int]:
    """Validate a header before anything is allocated for its payload."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError(f"short header ({len(header)} of {HEADER_SIZE} bytes)")
    magic, version, raw_type, flags, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a federation peer")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this is {VERSION})")
    try:
        msg_type = MsgType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown message type {raw_type}") from None
    if flags & ~FLAG_TAGGED:
        raise ProtocolError(f"unknown flags 0x{flags:x}")
    if length > max_size:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_size}")
    return msg_type, flags, length


def encode_payload(body: dict[str, Any]) -> bytes:
    """torch.save with its default pickle protocol 2, of plain containers only: mappings
    (``model.state_dict()``'s OrderedDict and its ``_metadata``) are written as dicts and
    tensors detached, because the receiver's allowlist (``safe_decode``) refuses the BUILD
    and Parameter records torch.save would write for them. Storage sharing is kept."""
    buf = io.BytesIO()
    torch.save(_plain(body), buf)
    return buf.getvalue()


def _plain(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach() if obj.requires_grad or type(obj) is not torch.Tensor else obj
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj


def decode_payload(raw: bytes | bytearray | memoryview, limits: Limits = STRICT) -> dict[str, Any]:
    """Decode an untrusted MODEL or UPDATE payload: a dict of plain values and plain CPU
    tensors, or ProtocolError("undecodable payload: ...") that keeps nothing alive."""
    return safe_decode.load(raw, limits)


def frame_limit(layout: Layout) -> int:
    """The largest frame a peer training a model of ``layout`` needs: ``DEFAULT_MAX_FRAME``,
    or twice the float32 state with its pickle for a larger model."""
    state = 4 * layout.float_numel + 8 * layout.int_numel
    return max(DEFAULT_MAX_FRAME, 2 * state + Limits.of(layout).pickle)


def encode_body(msg_type: MsgType, body: dict[str, Any]) -> bytes:
    """A message body as its type travels: control JSON, or torch.save bytes."""
    if msg_type in CONTROL_TYPES:
        return encode_control(msg_type.name, body)
    return encode_payload(body)


def decode_body(msg_type: MsgType, raw: bytes | bytearray | memoryview, limits: Limits = STRICT) -> dict[str, Any]:
    if msg_type in CONTROL_TYPES:
        return decode_control(msg_type.name, raw)
    return decode_payload(raw, limits)


def frame_tag(key: bytes, seq: int, header: bytes, payload: bytes | bytearray | memoryview) -> bytes:
    mac = hmac.new(key, seq.to_bytes(8, "big"), hashlib.sha256)
    mac.update(header)
    mac.update(payload)
    return mac.digest()


def pack_frame(msg_type: MsgType, payload: bytes, key: bytes | None = None, seq: int = 0) -> list[bytes]:
    """The pieces of one frame, ready for ``sendmsg``/``sendall`` without joining copies."""
    header = encode_header(msg_type, len(payload), FLAG_TAGGED if key else 0)
    if key is None:
        return [header, payload]
    return [header, payload, frame_tag(key, seq, header, payload)]


# --- sockets ----------------------------------------------------------------------------

def recv_exact(sock: socket.socket, n: int, deadline: float | None = None,
               into: bytearray | None = None) -> bytearray | memoryview:
    """Read exactly n bytes across partial recvs; the deadline bounds the whole read, so a
    peer that dribbles one byte at a time cannot hold the reader forever. With ``into``
    (at least n bytes) the bytes land there and a view of them is returned; without, the
    buffer grows by ``RECV_STEP`` as bytes arrive, so announcing a length costs nothing."""
    if into is not None:
        buf: bytearray | memoryview = memoryview(into)[:n]
        if len(buf) < n:
            raise ValueError(f"buffer of {len(buf)} bytes for {n}")
    else:
        buf = bytearray(min(n, RECV_STEP))
    got = 0
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"timed out after {got} of {n} bytes")
            sock.settimeout(remaining)
        if got == len(buf):  # only a grown bytearray can be full before n
            buf.extend(_ZEROS[:min(RECV_STEP, n - got)])  # type: ignore[union-attr]
        with memoryview(buf)[got:] as tail:  # released before the buffer may grow again
            k = sock.recv_into(tail, len(tail))
        if k == 0:
            raise ConnectionClosed(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


_ZEROS = memoryview(bytes(RECV_STEP))  # slices of it are views, not copies


class Connection:
    """One peer: frames in and out, byte counters, and the session keys once authenticated.

    Frames are tagged with ``send_key`` and checked with ``recv_key``; the handshake derives
    one key per direction, so a frame reflected back to its sender fails the check.
    Not thread-safe by design: exactly one thread owns a connection at a time, which also
    keeps TLS sockets safe (OpenSSL objects must not be read and written concurrently).
    """

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME, limits: Limits = STRICT) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self.limits = limits  # what a MODEL or UPDATE payload may hold (safe_decode)
        self.send_key: bytes | None = None
        self.recv_key: bytes | None = None
        self.send_seq = 0
        self.recv_seq = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def set_keys(self, send: bytes, recv: bytes) -> None:
        self.send_key, self.recv_key = send, recv

    @property
    def authenticated(self) -> bool:
        return self.recv_key is not None

    @property
    def key(self) -> bytes | None:
        """The send key; assigning one key sets both directions (tests, symmetric links)."""
        return self.send_key

    @key.setter
    def key(self, value: bytes | None) -> None:
        self.send_key = self.recv_key = value

    def send_payload(self, msg_type: MsgType, payload: bytes, timeout: float | None = None) -> int:
        """Send an already-encoded payload (a broadcast encodes once, sends many times)."""
        parts = pack_frame(msg_type, payload, self.send_key, self.send_seq)
        n = sum(len(p) for p in parts)
        self.sock.settimeout(timeout)
        if n <= 64 * 1024:  # one segment, so Nagle never holds a small frame back
            self.sock.sendall(b"".join(parts))
        else:  # large payloads go out as they are, without a joined copy
            for part in parts:
                self.sock.sendall(part)
        self.send_seq += 1
        self.bytes_sent += n
        return n

    def send(self, msg_type: MsgType, body: dict[str, Any], timeout: float | None = None) -> int:
        return self.send_payload(msg_type, encode_body(msg_type, body), timeout)

    def recv(
        self,
        expect: MsgType | Iterable[MsgType] | None = None,
        timeout: float | None = None,
        max_size: int | None = None,
    ) -> Message:
        """Receive and decode one message. ``timeout`` bounds the whole frame, not each recv call."""
        frame = self.recv_frame(expect, timeout, max_size)
        body, refusal = _try_decode(frame.type, frame.payload, self.limits)
        if refusal is None:
            return Message(frame.type, body, frame.nbytes, frame.payload)
        del frame  # a refused payload must not live on in this frame's traceback
        raise ProtocolError(refusal)

    def recv_frame(
        self,
        expect: MsgType | Iterable[MsgType] | None = None,
        timeout: float | None = None,
        max_size: int | None = None,
        buffer: bytearray | None = None,
    ) -> Frame:
        """Receive one authenticated frame of an expected type, its payload not yet decoded
        (the server decodes updates on its ingest thread). An ERROR frame raises RemoteError.

        Control messages (handshake, DONE, ERROR) are refused above ``HANDSHAKE_MAX_FRAME``
        whatever ``max_size`` says. ``buffer``, if the payload fits, receives it instead of
        a new allocation; the payload is then a view of it, valid until the buffer is reused.
        Without it, memory grows with the bytes that really arrive, not the announced length."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if deadline is None:
            self.sock.settimeout(None)
        header = bytes(recv_exact(self.sock, HEADER_SIZE, deadline))
        limit = max_size or self.max_frame
        msg_type, flags, length = decode_header(header, limit)
        if msg_type in CONTROL_TYPES and length > min(limit, HANDSHAKE_MAX_FRAME):
            raise ProtocolError(f"{msg_type.name} frame of {length} bytes exceeds the limit of "
                                f"{min(limit, HANDSHAKE_MAX_FRAME)}")
        tagged = bool(flags & FLAG_TAGGED)
        if tagged != (self.recv_key is not None):
            raise ProtocolError("frame authentication flag does not match the session")
        into = buffer if buffer is not None and len(buffer) >= length else None
        payload = recv_exact(self.sock, length, deadline, into)
        nbytes = HEADER_SIZE + length
        if self.recv_key is not None:
            tag = recv_exact(self.sock, TAG_SIZE, deadline)
            nbytes += TAG_SIZE
            if not hmac.compare_digest(tag, frame_tag(self.recv_key, self.recv_seq, header, payload)):
                raise ProtocolError("frame authentication failed (tampered, replayed, reflected or wrong key)")
        self.recv_seq += 1
        self.bytes_received += nbytes
        if msg_type == MsgType.ERROR and not _expects(expect, MsgType.ERROR):
            reason = decode_control(MsgType.ERROR.name, payload).get("reason", "unspecified error")
            raise RemoteError(reason)  # sanitized and bounded by the schema
        if expect is not None and not _expects(expect, msg_type):
            raise ProtocolError(f"unexpected {msg_type.name} message")
        return Frame(msg_type, payload, nbytes)

    def send_error(self, reason: str) -> None:
        """Best effort: tell the peer why we are closing; never raises."""
        try:
            self.send(MsgType.ERROR, {"reason": sanitize(reason, REASON_LIMIT)}, timeout=2.0)
        except (OSError, ProtocolError):
            pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _try_decode(msg_type: MsgType, raw: bytes | bytearray | memoryview,
                limits: Limits = STRICT) -> tuple[Any, str | None]:
    """(body, None) or (None, reason): the exception stays here, with its frames."""
    try:
        return decode_body(msg_type, raw, limits), None
    except ProtocolError as exc:
        return None, str(exc)


def _expects(expect: MsgType | Iterable[MsgType] | None, msg_type: MsgType) -> bool:
    if expect is None:
        return True
    if isinstance(expect, MsgType):
        return expect == msg_type
    return msg_type in set(expect)


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """Fetch a required, typed field from a decoded message (bool is not an int here)."""
    if name not in body:
        raise ProtocolError(f"message lacks field {name!r}")
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError(f"field {name!r} has type bool")
    if not isinstance(value, kinds):
        raise ProtocolError(f"field {name!r} has type {type(value).__name__}")
    return value


def wait_readable(sock: socket.socket, deadline: float | None = None) -> bool:
    """Block until the peer has sent something, hung up, or ``deadline`` (``time.monotonic()``;
    None: no limit) passed, without reading anything (the read that follows reports which):
    an idle peer costs no CPU and holds no receive buffer. False: the deadline passed first."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    if deadline is not None:
        return readable(sock, max(0.0, deadline - time.monotonic()))
    while not readable(sock, None):
        pass
    return True


def readable(sock: socket.socket, timeout: float | None) -> bool:
    """poll(), not select(): a thousand sessions put descriptors past select's limit of 1024."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(None if timeout is None else timeout * 1000))
