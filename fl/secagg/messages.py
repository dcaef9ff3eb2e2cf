"""The wire schema of secure aggregation, and the validation of every field.

Messages are dicts of ints, bytes and 1-D integer tensors, nothing else, so the project's
frames carry them as they are (``torch.save`` / ``torch.load(weights_only=True)``). Lists of
ids are int64 tensors, strictly increasing (so unique); lists of fixed-size byte strings
are one uint8 tensor of their concatenation (an empty ``bytes`` would not survive the
restricted unpickler, an empty tensor does); single keys are ``bytes``.

====================  ====  =========================================================
stage                 dir   fields
====================  ====  =========================================================
0 AdvertiseKeys       c→s   round, c_pk: bytes[32], s_pk: bytes[32]
  (key broadcast)     s→c   round, ids: int64[n], c_pks: uint8[32n], s_pks: uint8[32n],
                            graph_seed: bytes[32]
1 ShareKeys           c→s   round, receivers: int64[m], ciphertexts: uint8[92m],
                            digests: uint8[64m], b_commit: bytes[32]
  (routed shares)     s→c   round, senders: int64[m'], ciphertexts: uint8[92m'],
                            digests: uint8[64m']
2 MaskedInput         c→s   round, masked: uint32[L] (bits <= 32) or int64[L]
  (survivor list)     s→c   round, survivors: int64[n3]
3 Unmasking           c→s   round, b_owners: int64[p], b_shares: uint8[32p],
                            sk_owners: int64[q], sk_shares: uint8[32q]
====================  ====  =========================================================

A sealed share (92 bytes) is AES-GCM's nonce, the 64-byte plaintext ``share of b_u |
share of s_u^SK`` and the tag. A digest pair (64 bytes) is the dealer's commitment to the two
shares inside (``crypto.share_digest``): the holder checks what it opens against it, the
server what the holder reveals at stage 3. Every check raises SecAggError with one line.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from fl.secagg.crypto import KEY_BYTES, SEAL_OVERHEAD
from fl.secagg.errors import SecAggError

SHARE_BYTES = KEY_BYTES  # a share of a 32-byte secret is 32 bytes
PLAIN_BYTES = 2 * SHARE_BYTES  # share of b_u, then share of s_u^SK
SEALED_BYTES = PLAIN_BYTES + SEAL_OVERHEAD
DIGEST_PAIR = 2 * KEY_BYTES  # SHA-256 of the share of b_u, then of the share of s_u^SK
MAX_ID = (1 << 63) - 1

ADVERTISE = ("round", "c_pk", "s_pk")
KEYS = ("round", "ids", "c_pks", "s_pks", "graph_seed")
SHARES = ("round", "receivers", "ciphertexts", "digests", "b_commit")
ROUTED = ("round", "senders", "ciphertexts", "digests")
MASKED = ("round", "masked")
SURVIVORS = ("round", "survivors")
UNMASK = ("round", "b_owners", "b_shares", "sk_owners", "sk_shares")


def check_fields(msg: object, names: Sequence[str], what: str) -> Mapping[str, Any]:
    """``msg`` is a dict of exactly ``names``."""
    if not isinstance(msg, Mapping):
        raise SecAggError(f"{what} message must be a dict, got {type(msg).__name__}")
    if set(msg) != set(names):
        raise SecAggError(f"{what} message must have exactly the fields {', '.join(names)}")
    return msg


def check_id(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise SecAggError(f"{what} must be an int in [0, 2^63), got {type(value).__name__}")
    return value


def get_round(msg: Mapping[str, Any], expected: int) -> None:
    value = msg["round"]
    if type(value) is not int or value != expected:
        raise SecAggError(f"message for round {value!r}, expected round {expected}")


def get_bytes(msg: Mapping[str, Any], name: str, size: int) -> bytes:
    value = msg[name]
    if not isinstance(value, bytes) or len(value) != size:
        raise SecAggError(f"field {name!r} must be {size} bytes")
    return value


def _vector(msg: Mapping[str, Any], name: str, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    value = msg[name]
    if not isinstance(value, torch.Tensor) or value.dtype not in dtypes or value.ndim != 1 \
            or value.device.type != "cpu" or value.layout != torch.strided:
        kinds = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise SecAggError(f"field {name!r} must be a 1-D {kinds} tensor")
    return value


def get_ids(msg: Mapping[str, Any], name: str, max_count: int | None = None) -> list[int]:
    """A strictly increasing list of ids in [0, 2^63)."""
    t = _vector(msg, name, (torch.int64,))
    if max_count is not None and t.numel() > max_count:
        raise SecAggError(f"field {name!r} lists {t.numel()} ids, at most {max_count} expected")
    if t.numel() and (int(t[0]) < 0 or bool((t[1:] <= t[:-1]).any())):
        raise SecAggError(f"field {name!r} must hold distinct non-negative ids in increasing order")
    return t.tolist()


def get_blob(msg: Mapping[str, Any], name: str, item: int, count: int) -> bytes:
    """``count`` fixed-size items of ``item`` bytes from one uint8 tensor."""
    t = _vector(msg, name, (torch.uint8,))
    if t.numel() != item * count:
        raise SecAggError(f"field {name!r} must hold {count} items of {item} bytes")
    return bytes(t.tolist())


def get_ring(msg: Mapping[str, Any], name: str, length: int, bits: int) -> torch.Tensor:
    """An int64 copy of a ring vector of ``length`` elements in [0, 2^bits)."""
    t = _vector(msg, name, (wire_dtype(bits),))
    if t.numel() != length:
        raise SecAggError(f"field {name!r} has {t.numel()} elements, expected {length}")
    out = t.to(torch.int64, copy=True)
    if length and (int(out.min()) < 0 or int(out.max()) >> bits):
        raise SecAggError(f"field {name!r} must hold values in [0, 2^{bits})")
    return out


def wire_dtype(bits: int) -> torch.dtype:
    """uint32 when it holds the ring (as many bytes as float32), else int64."""
    return torch.uint32 if bits <= 32 else torch.int64


def to_wire(ring: torch.Tensor, bits: int) -> torch.Tensor:
    return ring.to(wire_dtype(bits))


def ids_tensor(ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(ids), dtype=torch.int64)


def blob_tensor(data: bytes) -> torch.Tensor:
    """Bytes as a uint8 tensor (a copy: the tensor owns its memory)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
