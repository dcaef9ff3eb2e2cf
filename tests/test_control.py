from __future__ import annotations

import json
import random
import secrets
import time
import tracemalloc

import pytest

from fl.wire.control import (
    CONTROL_MAX_FRAME,
    MAX_CLIENT_ID,
    MAX_DEPTH,
    NONCE_SIZE,
    REASON_LIMIT,
    SCHEMAS,
    _nesting,
    _tokens,
    decode_control,
    encode_control,
)
from fl.wire.errors import ProtocolError


def hello(**over):
    body = {"client_id": 3, "num_samples": 600, "options": {"quantization": True, "device": "cpu"},
            "nonce": secrets.token_hex(NONCE_SIZE)}
    body.update(over)
    return body


def raw_json(obj) -> bytes:
    return json.dumps(obj).encode()


# --- round trips --------------------------------------------------------------------------

@pytest.mark.parametrize("name,body", [
    ("HELLO", hello()),
    ("HELLO", hello(options={})),
    ("HELLO", hello(client_id=0, num_samples=0, options={"device": "auto"})),
    ("CHALLENGE", {"nonce": "ab" * NONCE_SIZE, "auth": True}),
    ("AUTH", {"proof": "0f" * 32}),
    ("AUTH", {"proof": None}),
    ("WELCOME", {"proof": None}),
    ("DONE", {"reason": "federation finished"}),
    ("ERROR", {"reason": "authentication failed"}),
    ("ERROR", {}),
])
def test_round_trip(name, body):
    raw = encode_control(name, body)
    assert len(raw) <= CONTROL_MAX_FRAME and raw.isascii()
    assert decode_control(name, raw) == body
    assert decode_control(name, bytearray(raw)) == body and decode_control(name, memoryview(raw)) == body


def test_encoding_is_canonical():
    """One spelling per message: the handshake transcript hashes these bytes."""
    body = hello()
    assert encode_control("HELLO", body) == encode_control("HELLO", dict(reversed(list(body.items()))))
    assert b" " not in encode_control("HELLO", body)


def test_every_message_type_has_a_schema():
    assert set(SCHEMAS) == {"HELLO", "CHALLENGE", "AUTH", "WELCOME", "DONE", "ERROR"}


# --- field by field -----------------------------------------------------------------------

@pytest.mark.parametrize("edit,needle", [
    ({"client_id": -1}, "out of range"),
    ({"client_id": MAX_CLIENT_ID + 1}, "out of range"),
    ({"client_id": True}, "integer"),
    ({"client_id": "1"}, "integer"),
    ({"num_samples": 10**12}, "out of range"),
    ({"nonce": "ab" * (NONCE_SIZE - 1)}, "hex"),
    ({"nonce": "AB" * NONCE_SIZE}, "hex"),  # one spelling: lowercase
    ({"nonce": "zz" * NONCE_SIZE}, "hex"),
    ({"nonce": None}, "hex"),
    ({"options": [1]}, "object"),
    ({"options": {"pad": "x"}}, "unknown key"),
    ({"options": {"quantization": 1}}, "true or false"),
    ({"options": {"device": "\x1b[31mcuda"}}, "one of"),
    ({"extra": 1}, "unknown key"),
])
def test_hello_fields_are_checked(edit, needle):
    with pytest.raises(ProtocolError, match=needle):
        decode_control("HELLO", raw_json(hello(**edit)))
    with pytest.raises(ProtocolError, match=needle):
        encode_control("HELLO", hello(**edit))  # we never send what we would refuse


def test_missing_field_refused():
    body = hello()
    del body["nonce"]
    with pytest.raises(ProtocolError, match="lacks 'nonce'"):
        decode_control("HELLO", raw_json(body))


@pytest.mark.parametrize("raw,needle", [
    (b"", "not valid JSON"),
    (b"[]", "must be an object"),
    (b'{"reason": "a", "reason": "b"}', "duplicate key"),
    (b'{"reason": 1.5}', "non-integer"),
    (b'{"proof": NaN}', "non-integer"),
    (b'{"proof": Infinity}', "non-integer"),
    (b'{"reason": ' + b"9" * 4000 + b"}", "digits"),
    (b'{"reason": "\xc3\xa9"}', "not ASCII"),
    (b"\x80\x02}q\x00.", "not ASCII"),  # a pickle is not a control message
    (b"PK\x03\x04" + bytes(100), "not valid JSON"),  # nor is a torch.save zip
], ids=["empty", "array", "dup", "float", "nan", "inf", "bigint", "utf8", "pickle", "zip"])
def test_malformed_json_refused(raw, needle):
    with pytest.raises(ProtocolError, match=needle):
        decode_control("ERROR", raw)


def test_oversized_control_refused_before_parsing():
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_control("HELLO", b" " * (CONTROL_MAX_FRAME + 1))


@pytest.mark.parametrize("opener", ["[", "{\"a\":"])
def test_deep_nesting_refused_without_recursion(opener):
    """json.loads('[' * 100000) raises RecursionError; the depth is measured before parsing."""
    for n in (MAX_DEPTH + 2, CONTROL_MAX_FRAME // len(opener), 1_000_000):
        raw = (opener * n).encode()
        t0 = time.process_time()
        with pytest.raises(ProtocolError):
            decode_control("ERROR", raw)
        assert time.process_time() - t0 < 0.5


def test_nested_error_reason_refused():
    """The attack that raised RecursionError out of the server's handler: a reason nested
    a few thousand lists deep, now refused by the depth bound (and the type check)."""
    raw = b'{"reason": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    with pytest.raises(ProtocolError, match="nested"):
        decode_control("ERROR", raw[:CONTROL_MAX_FRAME])
    with pytest.raises(ProtocolError, match="string"):
        decode_control("ERROR", b'{"reason": [["x"]]}')


def test_brackets_inside_strings_do_not_count():
    raw = raw_json({"reason": "[[[[{{{{ \\\" ]]]] \" [[["})
    assert decode_control("ERROR", raw)["reason"].startswith("[[[[{{{{")


HOSTILE_HELLO = ('"x\\' * CONTROL_MAX_FRAME)[:CONTROL_MAX_FRAME]  # every quote opens a string that never closes


@pytest.mark.parametrize("text", [HOSTILE_HELLO, '"' * CONTROL_MAX_FRAME, "\\" * CONTROL_MAX_FRAME,
                                  '{"a":"' + "[\\" * 2000, '["x\\"' * 600])
def test_the_scan_examines_each_character_once(text):
    """The work of the depth scan: its tokens follow each other and cover the text exactly,
    so no character is looked at twice (the old pattern rescanned to the end from every
    quote: quadratic). Within a token the pattern is possessive: no backtracking either."""
    ends = 0
    for m in _tokens(text):
        assert m.start() == ends
        ends = m.end()
    assert ends == len(text)
    with pytest.raises(ProtocolError):
        decode_control("HELLO", text.encode())


def _random_string(rng: random.Random) -> str:
    alphabet = ['"', "\\", "[", "]", "{", "}", "x", " ", "/", "\n", "\x1b", "\u00e9", "\u2028", "\ud83d"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def _random_value(rng: random.Random, depth: int) -> object:
    if depth == 0 or rng.random() < 0.3:
        return _random_string(rng)
    if rng.random() < 0.5:
        return [_random_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {_random_string(rng): _random_value(rng, depth - 1) for _ in range(rng.randint(0, 3))}


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def _strings(value: object) -> list[str]:
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    return [value]


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_the_scan_agrees_with_json_on_strings_and_depth(ensure_ascii):
    """For 3,000 random documents of strings full of quotes, backslashes, brackets and
    escapes, as json writes them: the string tokens are json's strings and the depth is
    the document's."""
    rng = random.Random(7)
    for _ in range(3000):
        value = _random_value(rng, 4)
        text = json.dumps(value, ensure_ascii=ensure_ascii)
        assert _nesting(text) == _depth(value)
        found = [json.loads(m.group()) for m in _tokens(text) if m.group().startswith('"')]
        assert found == _strings(value)


def test_peer_text_is_sanitized_and_bounded_on_decode():
    raw = raw_json({"reason": "\x1b[2J\r\n12:00 INFO forged line " + "x" * 5000})[:CONTROL_MAX_FRAME - 2] + b'"}'
    reason = decode_control("ERROR", raw)["reason"]
    assert "\x1b" not in reason and "\n" not in reason and "\r" not in reason
    assert reason.startswith("\\x1b[2J\\r\\n12:00 INFO forged")
    assert len(reason) < REASON_LIMIT + 40
    assert decode_control("DONE", raw_json({"reason": "bye\x07"}))["reason"] == "bye\\x07"


def test_refusals_are_cheap():
    """Nothing in a control payload can make the receiver allocate or compute much."""
    worst = [b"[" * CONTROL_MAX_FRAME, b'"' + b"\\\\" * (CONTROL_MAX_FRAME // 2 - 1) + b'"',
             b'{"reason": "' + b"\\u001b" * 600 + b'"}', b"9" * CONTROL_MAX_FRAME]
    tracemalloc.start()
    try:
        t0 = time.process_time()
        for raw in worst:
            try:
                decode_control("ERROR", raw)
            except ProtocolError:
                pass
        elapsed = time.process_time() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5 and peak < 1 << 20
