"""One client's contribution, from its decoded body to a checked flat delta, top to bottom.

:func:`parse` reads an UPDATE body once into an :class:`Update` (or a secure-aggregation
masked input's clear part into a :class:`Metadata`); the value checks follow as plain
functions, in the order the server applies them. Every refusal is an
:class:`InvalidUpdate` whose text is the reason logged and counted in the round's
``rejected``: a peer's bad data ends its update, never the process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from fl.common.layout import Entry, Layout, State
from fl.common.vectors import InvalidUpdate, finite, l2_norm
from fl.learning.quantization import dequantize_state
from fl.wire.errors import ProtocolError
from fl.wire.frames import field

# --- the record ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Update:
    """An UPDATE body, parsed and checked against the model's layout.

    ``floats`` is what the client trained to (flat or state-dict form), or, when
    ``quantized``, the dequantized 8-bit delta itself: :meth:`delta` gives the delta either
    way without copying the quantized one."""

    round: int
    num_samples: int
    metrics: dict[str, Any]
    quantized: bool
    floats: torch.Tensor  # float32, layout order
    ints: torch.Tensor  # int64 counters, absolute

    def delta(self, base_floats: torch.Tensor) -> torch.Tensor:
        return self.floats if self.quantized else self.floats - base_floats


def parse(body: dict[str, Any], layout: Layout, base: State, round: int, max_samples: int) -> Update:
    """The body of an UPDATE for ``round`` from a client allowed ``max_samples``: fields,
    sample count, then the weights in one of three forms, each shape- and finite-checked."""
    try:
        return _parse(body, layout, base, round, max_samples)
    except InvalidUpdate:
        raise
    except (ProtocolError, ValueError, TypeError) as exc:  # LayoutError, QuantizationError, field()
        raise InvalidUpdate(str(exc)) from None


def _parse(body: dict[str, Any], layout: Layout, base: State, round: int, max_samples: int) -> Update:
    if field(body, "round", int) != round:
        raise InvalidUpdate(f"update for round {body['round']}, expected {round}")
    num_samples = validate_num_samples(body.get("num_samples"), max_samples)
    metrics = field(body, "metrics", dict)
    quantized = field(body, "quantized", bool)
    if quantized:
        state = dequantize_state(field(body, "delta", dict), like=base)
        validate_state(state, base)
        floats, ints = layout.flatten(state)  # floating entries are deltas already
    elif "flat" in body:  # what client.py sends: the cheap form to decode, check and fold
        floats, ints = layout.unpack(body["flat"])
        validate_flat(floats)
    else:  # a plain state_dict, for other clients
        state = field(body, "state", dict)
        validate_state(state, base)
        floats, ints = layout.flatten(state)
    return Update(round, num_samples, metrics, quantized, floats, ints)


# --- the checks ------------------------------------------------------------------------------

def validate_num_samples(num_samples: object, limit: int) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 0 < num_samples <= limit:
        raise InvalidUpdate(f"implausible sample count {num_samples!r} (expected 1..{limit})")
    return num_samples


def validate_state(state: Mapping[str, object], reference: State) -> None:
    """Exact keys, shapes and dtypes of the global model, and only finite values."""
    if not isinstance(state, Mapping):
        raise InvalidUpdate(f"update is a {type(state).__name__}, not a state dict")
    missing = reference.keys() - state.keys()
    extra = state.keys() - reference.keys()
    if missing or extra:
        raise InvalidUpdate(f"keys differ from the model: missing {sorted(missing)[:3]}, "
                            f"extra {sorted(map(str, extra))[:3]}")
    for name, ref in reference.items():
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise InvalidUpdate(f"{name} is a {type(value).__name__}, not a tensor")
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise InvalidUpdate(f"{name} is {value.dtype}{list(value.shape)}, expected {ref.dtype}{list(ref.shape)}")
        if value.is_floating_point() and value.numel() and not finite(value):
            raise InvalidUpdate(f"{name} holds NaN or Inf")


def validate_flat(floats: torch.Tensor) -> None:
    """The float vector of a packed update (shapes are checked by ``Layout.unpack``)."""
    if floats.numel() and not finite(floats):
        raise InvalidUpdate("update holds NaN or Inf")


def check_variances(variances: Sequence[Entry], base: torch.Tensor, delta: torch.Tensor) -> None:
    """BatchNorm's running variances after the update must stay >= 0 (a negative one makes
    the next evaluation divide by the square root of a negative number)."""
    for e in variances:
        if bool(((base[e.offset:e.offset + e.numel] + delta[e.offset:e.offset + e.numel]) < 0).any()):
            raise InvalidUpdate(f"{e.name} holds negative variances")


def finite_norm(delta: torch.Tensor) -> float:
    """The delta's L2 norm, which the screen and the clip need; a non-finite one refuses it."""
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise InvalidUpdate("update norm is not finite")
    return norm


def checked_delta(update: Update, base_floats: torch.Tensor, variances: Sequence[Entry]) -> tuple[torch.Tensor, float]:
    """The update's delta from the model the client was sent, and its norm, once every value
    check passed (finiteness was checked by :func:`parse`)."""
    delta = update.delta(base_floats)
    check_variances(variances, base_floats, delta)
    return delta, finite_norm(delta)


# --- secure aggregation's clear metadata -----------------------------------------------------

@dataclass(frozen=True)
class Metadata:
    """What a client sends in clear beside its masked input, validated."""

    num_samples: int
    ints: torch.Tensor
    metrics: dict[str, Any]


def parse_metadata(meta: dict[str, Any], int_numel: int, max_samples: int) -> Metadata:
    """The clear part of a masked-input message (the masked vector is the coordinator's)."""
    num_samples = validate_num_samples(meta["num_samples"], max_samples)
    metrics, ints = meta["metrics"], meta["ints"]
    if not isinstance(metrics, dict):
        raise InvalidUpdate("metrics must be a dict")
    if not isinstance(ints, list) or len(ints) != int_numel or \
            not all(type(i) is int and -(1 << 63) <= i < (1 << 63) for i in ints):
        raise InvalidUpdate(f"ints must be a list of {int_numel} 64-bit ints")
    return Metadata(num_samples, torch.tensor(ints, dtype=torch.int64), metrics)


# --- the client's line in the round's metrics ------------------------------------------------

def client_record(client_id: int, samples: int, quantized: bool, bytes_up: int, norm: float | None,
                  metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One accepted update's entry in ``per_client``; the client's own figures only if sane."""
    return {"client_id": client_id, "samples": samples, "quantized": quantized, "bytes_up": bytes_up,
            "norm": norm, "train_s": reported(metrics.get("train_s")), "loss": reported(metrics.get("loss")),
            "accuracy": reported(metrics.get("accuracy"))}


def reported(value: Any) -> float | None:
    """A client-reported figure, kept only if it is a finite, non-negative number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None
