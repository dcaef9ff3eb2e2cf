"""Attackers for ``test_e2e_attacks.py`` and ``bench/hostile.py``: the attacks observed
against the federation, rebuilt as crafted frames sent over the real protocol
(``protocol.Connection``, ``security.client_handshake``) from 127.0.0.x only.

Nothing here runs an attack by itself: each function builds one payload or opens one
connection, and the caller decides what to send and what to expect back.
"""
from __future__ import annotations

import io
import json
import socket
import ssl
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from fl.wire.frames import FLAG_TAGGED, HEADER, HEADER_SIZE, TAG_SIZE, Connection, MsgType, encode_header, recv_exact
from fl.wire.handshake import client_handshake
from fl.wire.tls import write_certificate

LOOPBACK = "127.0.0.1"
ATTACKER = "127.0.0.2"  # another loopback address: per-address limits must keep 127.0.0.1 free


# --- connections ------------------------------------------------------------------------------

def connect(port: int, source: str = LOOPBACK, tls: ssl.SSLContext | None = None,
            timeout: float = 10.0) -> socket.socket:
    """A TCP (and, with ``tls``, TLS) connection to 127.0.0.1:port from ``source``."""
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout, source_address=(source, 0))
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=LOOPBACK)
        except BaseException:
            sock.close()
            raise
    return sock


def join(port: int, client_id: int, secret: bytes | None, num_samples: int = 500,
         options: dict[str, Any] | None = None, source: str = LOOPBACK, tls: ssl.SSLContext | None = None,
         timeout: float = 10.0) -> Connection:
    """The real handshake; the returned connection tags its frames like an honest client's."""
    conn = Connection(connect(port, source, tls, timeout))
    try:
        client_handshake(conn, client_id, num_samples, options or {"quantization": False}, secret, timeout=timeout)
    except BaseException:
        conn.close()
        raise
    return conn


def closed_within(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the server hangs up on ``sock`` (anything it sends first is read and
    ignored), or None if it is still open after ``limit``."""
    t0 = time.monotonic()
    end = t0 + limit
    try:
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return time.monotonic() - t0
    except (socket.timeout, ssl.SSLWantReadError):
        return None
    except OSError:  # reset, or TLS torn down: hung up as well
        return time.monotonic() - t0
    return None


def send_raw(port: int, data: bytes, source: str = ATTACKER, tls: ssl.SSLContext | None = None,
             limit: float = 5.0) -> float | None:
    """Connect, send ``data`` unauthenticated, and time how long until the server hangs up."""
    sock = connect(port, source, tls)
    try:
        sock.sendall(data)
        return closed_within(sock, limit)
    except OSError:  # the server hung up before we finished sending
        return 0.0
    finally:
        sock.close()


def frame(msg_type: MsgType, payload: bytes) -> bytes:
    """An untagged frame (what a peer sends before authenticating)."""
    return encode_header(msg_type, len(payload)) + payload


def recv_raw_frame(conn: Connection, timeout: float) -> bytes:
    """The next frame exactly as it came off the wire (header, payload, tag), undecoded."""
    deadline = time.monotonic() + timeout
    header = bytes(recv_exact(conn.sock, HEADER_SIZE, deadline))
    _, _, _, flags, length = HEADER.unpack(header)
    payload = bytes(recv_exact(conn.sock, length, deadline))
    tag = bytes(recv_exact(conn.sock, TAG_SIZE, deadline)) if flags & FLAG_TAGGED else b""
    conn.recv_seq += 1
    return header + payload + tag


def send_header_only(conn: Connection, msg_type: MsgType, length: int) -> None:
    """A tagged header announcing ``length`` bytes, and nothing after it."""
    conn.sock.sendall(encode_header(msg_type, length, FLAG_TAGGED if conn.send_key else 0))


def make_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as ``python -m fl.wire.tls`` writes one
    (replacing one a previous run left in ``folder``)."""
    for name in ("cert.pem", "key.pem"):
        (folder / name).unlink(missing_ok=True)
    cert, key, _ = write_certificate(["127.0.0.1"], folder, days=1)
    return cert, key


# --- 1, 2, 11: what an outsider sends before authenticating ------------------------------------

def torch_zip(records: dict[str, bytes]) -> bytes:
    """An archive laid out exactly as torch.save writes one, holding ``records``."""
    buf = io.BytesIO()
    with torch.serialization._open_zipfile_writer(buf) as zf:
        for name, data in records.items():
            zf.write_record(name, data, len(data))
    return buf.getvalue()


def bytearray_pickle(n: int = 1 << 30) -> bytes:
    """A protocol-2 pickle of ``bytearray(n)``: ~40 bytes that allocate n (a GiB) when loaded."""
    return b"\x80\x02c__builtin__\nbytearray\nJ" + n.to_bytes(4, "little") + b"\x85R."


def bytearray_hello() -> bytes:
    """The observed 455-byte HELLO: a torch.save archive whose pickle is ``bytearray(1 << 30)``."""
    return torch_zip({"data.pkl": bytearray_pickle(), "byteorder": b"little", "version": b"3\n"})


def deflate_hello() -> bytes:
    """A HELLO zip whose data.pkl is DEFLATE-compressed: 3 KB that inflate to a 3-million-item list."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("archive/data.pkl", b"\x80\x02](" + b"N" * 3_000_000 + b"e.")
        z.writestr("archive/byteorder", b"little")
    return buf.getvalue()


def counter_hello() -> bytes:
    """``Counter(bytearray(200_000_000))``: counting 2e8 bytes holds the GIL for seconds."""
    return (b"\x80\x02ccollections\nCounter\nc__builtin__\nbytearray\nJ" + (200_000_000).to_bytes(4, "little")
            + b"\x85R\x85R.")


def nested_error(depth: int = 2000) -> bytes:
    """An ERROR whose reason nests ``depth`` lists deep (just under the 4 KiB control limit)."""
    return b'{"reason":' + b"[" * depth + b"]" * depth + b"}"


FORGED_LINE = "round 5/5: accuracy 99.90% loss 0.0010 | 3 of 3 clients"


def escape_error() -> bytes:
    """An ERROR whose reason clears the terminal line and forges a log line in colour.
    Written by hand: the protocol's own encoder would sanitize it."""
    reason = f"\x1b[2K\r\x1b[1A12:00:00 INFO    server: {FORGED_LINE}\n\x1b[32mok\x1b[0m\u202e"
    return json.dumps({"reason": reason}).encode("ascii")


# --- 3, 4, 6: what a participant (holding a secret) sends ---------------------------------------

def float_names(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def update_body(round_num: int, num_samples: int, state: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
    return {"round": round_num, "num_samples": num_samples, "quantized": False,
            "metrics": {"loss": 1.0, "accuracy": 0.5, "train_s": 0.1}, "state": state, **extra}


def scaled_state(base: dict[str, torch.Tensor], factor: float = 1e6, seed: int = 0) -> dict[str, torch.Tensor]:
    """base + factor x a small random delta (an honest-sized step, boosted); variances only
    grow, so that the norm screen, not the variance check, is what has to stop it."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        step = factor * 1e-3 * torch.randn(v.shape, generator=g)
        out[k] = v + (step.abs() if k.endswith("running_var") else step)
    return out


def constant_state(base: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    """Every floating value ``value`` (3e38: finite, the float32 maximum is 3.4e38; 0: the zero model)."""
    return {k: torch.full_like(v, value) if v.is_floating_point() else v.clone() for k, v in base.items()}


def alternating_state(base: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    """+-value in alternate elements (variances +value): finite, but the range of every row
    is 2 x value, which overflows float32 once value > 1.7e38."""
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = torch.full_like(v, value)
        else:
            sign = (torch.arange(v.numel()) % 2 * 2 - 1).to(v.dtype).reshape(v.shape)
            out[k] = sign * value
    return out


def negative_variance_state(base: dict[str, torch.Tensor], value: float = -1000.0) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) if k.endswith("running_var") else v.clone() for k, v in base.items()}


def quantized_scale_delta(base: dict[str, torch.Tensor], scale: float = 1e30, seed: int = 0) -> dict[str, Any]:
    """An 8-bit delta whose every scale is ``scale``: well-formed, finite, and huge."""
    g = torch.Generator().manual_seed(seed)
    delta: dict[str, Any] = {}
    for k, v in base.items():
        if not v.is_floating_point():
            delta[k] = v.clone()
            continue
        channels = (v.shape[0],) if v.ndim >= 2 else ()
        delta[k] = {"q": torch.randint(0, 256, v.shape, generator=g, dtype=torch.uint8),
                    "lo": torch.zeros(channels), "scale": torch.full(channels, scale)}
    return delta


def shadowed_nan_payload(round_num: int, base: dict[str, torch.Tensor]) -> bytes:
    """An UPDATE whose first weight is all NaN and carries instance attributes that shadow
    ``is_floating_point`` and ``numel`` (``bool()`` is False, ``int()`` is 0), so a validator
    that asks the tensor itself would skip its finiteness check. torch.save writes it with
    the attribute-setting rebuild (``_rebuild_from_type_v2``)."""
    state = {k: v.clone() for k, v in base.items()}
    name = float_names(state)[0]
    poisoned = torch.full_like(state[name], float("nan"))
    poisoned.is_floating_point = bool
    poisoned.numel = int
    state[name] = poisoned
    buf = io.BytesIO()
    torch.save(update_body(round_num, 500, state), buf)
    return buf.getvalue()


def many_objects_payload(size: int = 16_800_000) -> bytes:
    """A ``size``-byte UPDATE laid out like torch.save's, whose data.pkl is a list of ~size/2
    small ints: unpickled, millions of objects (the observed ~1.2 GB per update)."""
    n = (size - 900) // 2
    return torch_zip({"data.pkl": b"\x80\x02]q\x00(" + b"K\x01" * n + b"e.", "byteorder": b"little",
                      "version": b"3\n"})


def compressed_record_payload(size: int = 1_000_000) -> bytes:
    """A ~``size``-byte UPDATE zip whose data.pkl is DEFLATE-compressed (it inflates 100x)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(zipfile.ZipInfo("archive/data.pkl"), b"\x80\x02](" + b"N" * (100 * size) + b"e.",
                   compress_type=zipfile.ZIP_DEFLATED)
        z.writestr(zipfile.ZipInfo("archive/data/0"), torch.randn(size // 4).numpy().tobytes(),
                   compress_type=zipfile.ZIP_STORED)
    return buf.getvalue()


# --- issue 21: what a secure-aggregation participant sends ---------------------------------------

SMALL_ORDER_KEY = bytes(32)  # X25519's point of order 1 (0, encoded): every key agreement with it gives 0


def small_order_participant(port: int, client_id: int, secret: bytes | None, stop: Any,
                            source: str = ATTACKER, joins: int = 20) -> list[str]:
    """A participant of a ``--secure-aggregation`` server whose mask key is the small-order
    point: it runs the real client's stages 0 and 1 (so it is a key holder every honest
    neighbour must agree a pairwise mask with, at stage 2), then says nothing more. It
    rejoins whenever the server hangs up, at most ``joins`` times, until ``stop`` is set or
    the server says DONE. What it saw, one line per event (the server's refusals among them)."""
    from fl.wire.errors import ConnectionClosed, RemoteError  # noqa: PLC0415

    seen: list[str] = []
    for _ in range(joins):
        if stop.is_set():
            break
        try:
            conn = join(port, client_id, secret, options={"quantization": False, "secagg": True}, source=source)
        except (OSError, RemoteError, ConnectionClosed) as exc:
            seen.append(f"join failed: {exc}")
            time.sleep(0.5)
            continue
        try:
            if _small_order_session(conn, client_id, stop, seen):
                return seen
        except RemoteError as exc:
            seen.append(f"refused: {exc}")
        except (OSError, ConnectionClosed) as exc:
            seen.append(f"closed: {type(exc).__name__}")
        finally:
            conn.close()
    return seen


def _small_order_session(conn: Connection, client_id: int, stop: Any, seen: list[str]) -> bool:
    """One connection of :func:`small_order_participant`; True once the server said DONE."""
    from fl.secagg import SecAggClient  # noqa: PLC0415
    from fl.secagg.wire import ADVERTISE_KEYS, SHARE_KEYS, Settings, decode_server, encode  # noqa: PLC0415
    from fl.wire.frames import readable  # noqa: PLC0415

    client = None
    while not stop.is_set():
        if not readable(conn.sock, 1.0):
            continue
        msg = conn.recv(timeout=30.0)
        if msg.type == MsgType.DONE:
            seen.append("done")
            return True
        if msg.type == MsgType.ERROR:
            seen.append(f"refused: {msg.body.get('reason')}")
            return False
        if msg.type == MsgType.MODEL and msg.body.get("secagg"):
            settings = Settings.from_dict(msg.body["secagg"])
            client = SecAggClient(client_id, settings.config(), settings.round)
            client._s_pk = SMALL_ORDER_KEY  # the real client, its mask key replaced
            conn.send(MsgType.SECAGG, encode(ADVERTISE_KEYS, client.advertise_keys()))
            seen.append(f"sent a small-order key in round {settings.round}")
        elif msg.type == MsgType.SECAGG and client is not None and client.stage == 1:
            keys = decode_server(msg.body, ADVERTISE_KEYS)
            if isinstance(keys, str):
                seen.append(f"aborted: {keys}")
                continue
            conn.send(MsgType.SECAGG, encode(SHARE_KEYS, client.share_keys(keys)))
            seen.append("shared keys")
        else:
            seen.append(f"got {msg.type.name}")
    return False
