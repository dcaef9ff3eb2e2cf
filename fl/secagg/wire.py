"""Secure aggregation on the wire: the MODEL message's ``secagg`` settings and the SECAGG
message that carries each stage of ``secagg/`` between a client and the server.

A server started with ``--secure-aggregation`` puts ``secagg`` (:class:`Settings`) in every
MODEL; a client that announced ``"secagg": true`` in its HELLO options then answers with
SECAGG messages instead of an UPDATE. Every SECAGG body is a dict with an int ``stage``
plus the fields of that stage's message in ``secagg.messages``, sent with ``torch.save``
and read back through ``safe_decode`` like MODEL and UPDATE (so only plain tensors, ints,
floats and strings). Two conversions make the core's messages fit that allowlist: 32-byte
keys (``bytes``) travel as uint8 tensors, and the uint32 masked vector as the int32 tensor
of the same bits (``safe_decode`` admits the storage types ``torch.save`` has always
written, not uint32's). :func:`decode` undoes both and nothing else: the core validates
every field (types, sizes, ranges, ids, order) before its state changes.

=====  ====  =================================================================
stage  dir   body (besides ``stage``)
=====  ====  =================================================================
0      c→s   round, c_pk: u8[32], s_pk: u8[32]
0      s→c   round, ids: i64[n], c_pks: u8[32n], s_pks: u8[32n], graph_seed: u8[32]
1      c→s   round, receivers: i64[m], ciphertexts: u8[92m], digests: u8[64m], b_commit: u8[32]
1      s→c   round, senders: i64[m'], ciphertexts: u8[92m'], digests: u8[64m']
2      c→s   round, masked: i32[L] (the uint32 ring; int64 above 32 bits), and in clear:
             num_samples: int, metrics: {loss, accuracy, train_s}, ints: i64[K]
             (BatchNorm's integer counters, which are not averaged in the ring)
2      s→c   round, survivors: i64[n3]
3      c→s   round, b_owners, b_shares, sk_owners, sk_shares (no reply)
4      s→c   round, reason: str (ABORT: this client's part in the round is over; it waits
             for the next MODEL on the same connection)
=====  ====  =================================================================

Versioning: the frame header's protocol version is unchanged (an older peer refuses the
unknown message type 9 in one line); ``Settings.version`` versions this schema, and a
client refuses a version it does not know (2: share digests, the attempt, the headroom).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fl.common.logs import sanitize
from fl.secagg import FixedPoint, SecAggConfig, SecAggError
from fl.secagg.messages import ADVERTISE, KEYS, MASKED, ROUTED, SHARES, SURVIVORS, UNMASK, blob_tensor
from fl.wire.control import REASON_LIMIT
from fl.wire.errors import ProtocolError

WIRE_VERSION = 2
ADVERTISE_KEYS, SHARE_KEYS, MASKED_INPUT, UNMASKING, ABORT = 0, 1, 2, 3, 4
STAGE_NAMES = {0: "AdvertiseKeys", 1: "ShareKeys", 2: "MaskedInput", 3: "Unmasking", 4: "Abort"}
CLIENT_FIELDS = {0: ADVERTISE, 1: SHARES, 2: MASKED, 3: UNMASK}
SERVER_FIELDS = {0: KEYS, 1: ROUTED, 2: SURVIVORS}
METADATA = ("num_samples", "metrics", "ints")  # stage 2, in clear beside the masked vector
KEY_FIELDS = frozenset({"c_pk", "s_pk", "graph_seed", "b_commit"})  # bytes in the core


# --- the round's settings, sent in MODEL ----------------------------------------------------

def default_threshold(group: int) -> int:
    """t = max(2, ceil(2g/3)) for groups of g clients: above half the group (so a server
    that tells clients different survivor lists cannot collect t shares of both secrets of
    one client) and a third of the group may drop out."""
    return max(2, math.ceil(2 * group / 3))


def group_size(sampled: int, neighbours: int | None) -> int:
    """A client's group: itself and its neighbours (SecAgg+), or every sampled client."""
    return sampled if neighbours is None or neighbours >= sampled else neighbours


@dataclass(frozen=True)
class Settings:
    """What the server requires of a round, in its MODEL message; both ends derive the
    ``SecAggConfig`` and the ``FixedPoint`` encoding from it."""

    round: int  # the secure-aggregation round id (the federation's round number)
    threshold: int  # t
    min_clients: int  # fewest clients at any stage (>= t)
    bits: int  # the ring Z_{2^bits}
    clip: float  # each coordinate of a delta is clipped to [-clip, clip] before encoding
    max_clients: int  # the sum of this many encodings must decode: the clients sampled
    num_shares: int | None  # SecAgg+ group size; None: everyone
    length: int  # coordinates: the model's floating entries, flattened
    l2_clip: float | None = None  # clients clip their delta to this L2 norm first (--clip-norm)
    attempt: int = 0  # which try of the round this is: it enters the clients' training seed

    def rounding_margin(self) -> float:
        """How far rounding to the grid may move an encoded vector in L2: sqrt(L) 2^-(f+1)."""
        return math.sqrt(self.length) * self.fixed_point().step / 2

    def l2_target(self, bound: float) -> float:
        """What a client clips its delta to so that its encoding stays within :meth:`l2_limit`."""
        margin = self.rounding_margin()
        return bound - margin if bound > 2 * margin else bound

    def l2_limit(self) -> float | None:
        """The L2 norm no honest client's encoded delta exceeds: ``l2_clip`` (plus the rounding
        margin when ``l2_clip`` is too small to leave it out); None without ``l2_clip``."""
        if self.l2_clip is None:
            return None
        return self.l2_clip if self.l2_clip > 2 * self.rounding_margin() else self.l2_clip + self.rounding_margin()

    def config(self) -> SecAggConfig:
        return SecAggConfig(length=self.length, threshold=self.threshold, bits=self.bits,
                            num_shares=self.num_shares, min_clients=self.min_clients)

    def fixed_point(self) -> FixedPoint:
        return FixedPoint(bits=self.bits, clip=self.clip, max_clients=self.max_clients)

    def to_dict(self) -> dict[str, Any]:
        return {"version": WIRE_VERSION, "round": self.round, "threshold": self.threshold,
                "min_clients": self.min_clients, "bits": self.bits, "clip": float(self.clip),
                "max_clients": self.max_clients, "num_shares": self.num_shares or 0, "length": self.length,
                "l2_clip": float(self.l2_clip or 0.0), "attempt": self.attempt}

    @classmethod
    def from_dict(cls, value: object) -> "Settings":
        """The settings a server sent; ProtocolError (one line) for anything malformed."""
        if not isinstance(value, Mapping):
            raise ProtocolError("secagg settings must be a dict")
        names = ("version", "round", "threshold", "min_clients", "bits", "clip", "max_clients", "num_shares",
                 "length", "l2_clip", "attempt")
        if set(value) != set(names):
            raise ProtocolError(f"secagg settings must have exactly the fields {', '.join(names)}")
        if value["version"] != WIRE_VERSION or type(value["version"]) is not int:
            raise ProtocolError(f"secagg version {sanitize(value['version'], 20)} not supported (this client "
                                f"speaks {WIRE_VERSION})")
        for name in ("round", "threshold", "min_clients", "bits", "max_clients", "num_shares", "length", "attempt"):
            if type(value[name]) is not int or value[name] < 0:
                raise ProtocolError(f"secagg setting {name!r} must be a non-negative int")
        for name in ("clip", "l2_clip"):
            if type(value[name]) is not float or not math.isfinite(value[name]) or value[name] < 0:
                raise ProtocolError(f"secagg setting {name!r} must be a finite float >= 0")
        settings = cls(round=value["round"], threshold=value["threshold"], min_clients=value["min_clients"],
                       bits=value["bits"], clip=value["clip"], max_clients=value["max_clients"],
                       num_shares=value["num_shares"] or None, length=value["length"],
                       l2_clip=value["l2_clip"] or None, attempt=value["attempt"])
        try:
            settings.config()
            settings.fixed_point()
        except ValueError as exc:
            raise ProtocolError(f"bad secagg settings: {sanitize(str(exc), 120)}") from None
        return settings


# --- SECAGG bodies ----------------------------------------------------------------------------

def encode(stage: int, msg: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A core message as a SECAGG body: keys as uint8 tensors, a uint32 ring as int32 bits."""
    body: dict[str, Any] = {"stage": stage}
    for name, value in msg.items():
        if isinstance(value, bytes):
            value = blob_tensor(value)
        elif isinstance(value, torch.Tensor) and value.dtype == torch.uint32:
            value = value.view(torch.int32)
        body[name] = value
    body.update(extra)
    return body


def abort(round_id: int, reason: str) -> dict[str, Any]:
    """The server's ABORT body: this client's part in the round is over."""
    return {"stage": ABORT, "round": round_id, "reason": sanitize(reason, REASON_LIMIT)}


def stage_of(body: Mapping[str, Any]) -> int:
    stage = body.get("stage")
    if type(stage) is not int or stage not in STAGE_NAMES:
        raise SecAggError(f"SECAGG message with stage {sanitize(stage, 20)}, expected 0..4")
    return stage


def decode(body: Mapping[str, Any], stage: int, fields: tuple[str, ...],
           extra: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the core message, the extra fields) of a SECAGG body of ``stage``; SecAggError if
    the stage or the set of fields is wrong. Values are only converted back, not checked:
    the core checks every field of the message, the caller the extra ones."""
    got = stage_of(body)
    if got != stage:
        raise SecAggError(f"SECAGG message for stage {STAGE_NAMES[got]}, expected {STAGE_NAMES[stage]}")
    expected = {"stage", *fields, *extra}
    if set(body) != expected:
        raise SecAggError(f"SECAGG {STAGE_NAMES[stage]} message must have exactly the fields "
                          f"{', '.join(sorted(expected))}")
    msg = {}
    for name in fields:
        value = body[name]
        if name in KEY_FIELDS and isinstance(value, torch.Tensor) and value.dtype == torch.uint8 \
                and value.ndim == 1 and type(value) is torch.Tensor:
            value = value.numpy().tobytes()
        elif name == "masked" and isinstance(value, torch.Tensor) and value.dtype == torch.int32:
            value = value.view(torch.uint32)
        msg[name] = value
    return msg, {name: body[name] for name in extra}


def decode_client(body: Mapping[str, Any], stage: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A client's message of ``stage`` (with the clear metadata at stage 2)."""
    return decode(body, stage, CLIENT_FIELDS[stage], METADATA if stage == MASKED_INPUT else ())


def decode_server(body: Mapping[str, Any], stage: int) -> dict[str, Any] | str:
    """The server's answer to ``stage``: the core message, or the reason of an ABORT."""
    if stage_of(body) == ABORT:
        _, extra = decode(body, ABORT, ("round",), ("reason",))
        reason = extra["reason"]
        return sanitize(reason, REASON_LIMIT) if isinstance(reason, str) else "no reason given"
    return decode(body, stage, SERVER_FIELDS[stage])[0]
