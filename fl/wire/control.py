"""Control messages as small, strictly checked JSON: HELLO, CHALLENGE, AUTH, WELCOME, DONE
and ERROR.

Everything a peer can send before it has authenticated is one of these, so none of it
ever reaches ``torch.load``: a control payload is at most ``CONTROL_MAX_FRAME`` bytes of
ASCII JSON, its nesting is measured before ``json.loads`` sees it (``"[[[["`` would
otherwise recurse) in one left-to-right pass that examines each character once, whatever
the text (a pattern that failed on an unterminated string and retried from the next quote
would make a pre-auth message quadratic), numbers are short integers (no floats, NaN or 4000-digit ints), keys
are unique, and each message has a fixed schema checked field by field: integers in
range, nonces and proofs as fixed-length lowercase hex, option names and values from a
closed list, unknown keys refused. Free text from the peer (DONE and ERROR reasons) is
bounded and sanitized as it is decoded, so no caller can log it raw.

Every WELCOME names what the server trains (the model, its layout fingerprint, the
dataset), so a client with another model stops before training. A client that asks to
join (HELLO ``join``) is also told the data split of the run and, when it brought no
``client_id``, the id (shard) the server gave it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from fl.common.logs import sanitize
from fl.wire.errors import ProtocolError

CONTROL_MAX_FRAME = 4096  # the largest control message (an ERROR of escaped text) is ~2 KB
MAX_DEPTH = 3  # HELLO's options are the deepest: {"options": {...}}
MAX_INT_DIGITS = 19
MAX_CLIENT_ID = 999_999  # the one bound on client ids: HELLO, the clients file
MAX_NUM_SAMPLES = 10**9
NONCE_SIZE = 32
PROOF_SIZE = 32  # HMAC-SHA256
REASON_LIMIT = 256  # any reason a peer sends (ERROR, DONE, a SECAGG abort); with its "...[N more chars]" note < 300
DEVICES = ("auto", "cpu", "cuda")

# One token at every position, so finditer never fails and retries: a string (to its
# closing quote, or to the end when it has none; possessive, no backtracking), a run of
# other characters, or one bracket.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*+"?|[^"\[\]{}]++|.', re.DOTALL)
_HEX = re.compile(r"[0-9a-f]*")


class Spec:
    """One field's type and bounds; ``check`` returns the value as the receiver keeps it."""

    def check(self, value: Any, where: str) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    lo: int
    hi: int

    def check(self, value: Any, where: str) -> int:
        if type(value) is not int:  # bool is not an int here
            raise ProtocolError(f"{where} must be an integer, not {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise ProtocolError(f"{where} = {value} is out of range {self.lo}..{self.hi}")
        return value


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, where: str) -> bool:
        if type(value) is not bool:
            raise ProtocolError(f"{where} must be true or false, not {type(value).__name__}")
        return value


@dataclass(frozen=True)
class Choice(Spec):
    options: tuple[str, ...]

    def check(self, value: Any, where: str) -> str:
        if type(value) is not str or value not in self.options:
            raise ProtocolError(f"{where} must be one of {', '.join(self.options)}, not {sanitize(value, 40)}")
        return value


@dataclass(frozen=True)
class Hex(Spec):
    """Exactly ``nbytes`` bytes as lowercase hex (one spelling per value); null if ``nullable``."""

    nbytes: int
    nullable: bool = False

    def check(self, value: Any, where: str) -> str | None:
        if value is None and self.nullable:
            return None
        if type(value) is not str or len(value) != 2 * self.nbytes or not _HEX.fullmatch(value):
            raise ProtocolError(f"{where} must be {self.nbytes} bytes of lowercase hex")
        return value


@dataclass(frozen=True)
class Pattern(Spec):
    """A short string of one fixed form (a name, a decimal number), refused if it differs."""

    regex: str
    what: str

    def check(self, value: Any, where: str) -> str:
        if type(value) is not str or not re.fullmatch(self.regex, value):
            raise ProtocolError(f"{where} must be {self.what}")
        return value


@dataclass(frozen=True)
class Text(Spec):
    """Free text from the peer: bounded and sanitized, whatever it held."""

    limit: int

    def check(self, value: Any, where: str) -> str:
        if type(value) is not str:
            raise ProtocolError(f"{where} must be a string, not {type(value).__name__}")
        return sanitize(value, self.limit)


@dataclass(frozen=True)
class Obj(Spec):
    fields: Mapping[str, Spec]
    optional: frozenset[str] = field(default_factory=frozenset)

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if type(value) is not dict:
            raise ProtocolError(f"{where} must be an object, not {type(value).__name__}")
        unknown = [k for k in value if k not in self.fields]
        if unknown:
            raise ProtocolError(f"{where} has unknown key {sanitize(unknown[0], 40)!r}")
        missing = [k for k in self.fields if k not in value and k not in self.optional]
        if missing:
            raise ProtocolError(f"{where} lacks {missing[0]!r}")
        return {k: self.fields[k].check(v, f"{where}.{k}") for k, v in value.items()}


# "secagg": the client can run secure aggregation (fl/secagg/wire.py); absent means it cannot.
OPTIONS = Obj({"quantization": Bool(), "device": Choice(DEVICES), "secagg": Bool()},
              frozenset({"quantization", "device", "secagg"}))
_REASON = Obj({"reason": Text(REASON_LIMIT)}, frozenset({"reason"}))
_PROOF = Obj({"proof": Hex(PROOF_SIZE, nullable=True)})
# The data split (learning/config.py's Split): its meaning is checked there, its shape here.
_DECIMAL = Pattern(r"[0-9]{1,20}(\.[0-9]{1,20})?(e[-+]?[0-9]{1,3})?", "a decimal number such as 0.5")
SPLIT = Obj({"num_shards": Int(1, MAX_CLIENT_ID + 1), "scheme": Pattern(r"[a-z]{1,16}", "a scheme's name"),
             "alpha": _DECIMAL, "seed": Int(-2**63, 2**63 - 1),
             "dataset": Pattern(r"[a-z0-9-]{1,24}", "a dataset's name"), "test_fraction": _DECIMAL},
            frozenset({"dataset", "test_fraction"}))
# What the server trains (handshake.Terms), in every WELCOME: a model is a built-in's name or
# package.module:factory, its layout the fingerprint of its state_dict (common/layout.py).
TERMS = {"model": Pattern(r"[a-z0-9-]{1,32}|[A-Za-z_][A-Za-z0-9_.]{0,199}:[A-Za-z_][A-Za-z0-9_]{0,199}",
                          "a model's name or package.module:factory"),
         "layout": Int(0, 2**63 - 1), "dataset": Pattern(r"[a-z0-9-]{1,24}", "a dataset's name")}
SCHEMAS: dict[str, Obj] = {
    # No client_id: "give me a free one" (with join only, which asks for the split).
    "HELLO": Obj({"client_id": Int(0, MAX_CLIENT_ID), "num_samples": Int(0, MAX_NUM_SAMPLES),
                  "options": OPTIONS, "nonce": Hex(NONCE_SIZE), "join": Bool()}, frozenset({"client_id", "join"})),
    "CHALLENGE": Obj({"nonce": Hex(NONCE_SIZE), "auth": Bool()}),
    "AUTH": _PROOF,
    "WELCOME": Obj({"proof": Hex(PROOF_SIZE, nullable=True), "client_id": Int(0, MAX_CLIENT_ID), "split": SPLIT,
                    **TERMS}, frozenset({"client_id", "split", *TERMS})),
    "DONE": _REASON,
    "ERROR": _REASON,
}


def encode_control(name: str, body: Mapping[str, Any]) -> bytes:
    """Check ``body`` against the schema of message ``name`` and write it as canonical JSON
    (sorted keys, no spaces, ASCII), so the bytes a transcript hashes are well defined."""
    checked = SCHEMAS[name].check(dict(body), name)
    raw = json.dumps(checked, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                     allow_nan=False).encode("ascii")
    if len(raw) > CONTROL_MAX_FRAME:
        raise ProtocolError(f"{name} of {len(raw)} bytes exceeds {CONTROL_MAX_FRAME}")
    return raw


def decode_control(name: str, raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse and check a control payload from a peer; any deviation is a ProtocolError."""
    if len(raw) > CONTROL_MAX_FRAME:
        raise ProtocolError(f"{name} of {len(raw)} bytes exceeds {CONTROL_MAX_FRAME}")
    try:
        text = bytes(raw).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"{name} is not ASCII JSON") from None
    depth = _nesting(text)
    if depth > MAX_DEPTH:
        raise ProtocolError(f"{name} is nested {depth} deep (at most {MAX_DEPTH})")
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_int=_short_int,
                           parse_float=_no_float, parse_constant=_no_float)
    except (ValueError, RecursionError) as exc:  # RecursionError cannot happen after _nesting
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ProtocolError(f"{name} is not valid JSON: {sanitize(reason, 80)}") from None
    return SCHEMAS[name].check(value, name)


def _tokens(text: str) -> Iterator[re.Match[str]]:
    """``text`` cut into consecutive tokens (``_TOKEN``) that cover it exactly once."""
    return _TOKEN.finditer(text)


def _nesting(text: str) -> int:
    """How deep arrays and objects nest, counted without parsing (brackets inside strings
    do not count); one pass over the tokens, no recursion."""
    depth = peak = 0
    for m in _tokens(text):
        bracket = m.group()
        if bracket in ("[", "{"):
            depth += 1
            peak = max(peak, depth)
        elif bracket in ("]", "}"):
            depth -= 1
    return peak


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ProtocolError("duplicate key in a control message")
    return out


def _short_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError(f"integer of {len(digits)} digits in a control message")
    return int(digits)


def _no_float(text: str) -> Any:
    raise ProtocolError(f"non-integer number {sanitize(text, 40)} in a control message")
