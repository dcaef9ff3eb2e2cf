"""8-bit affine quantization of model updates, so a client's uplink costs ~1/4 of float32.

Clients send ``delta = local - global`` rather than weights: deltas are small and centred, so
256 levels per output channel lose little. Packed states are plain dicts of tensors, so they
survive ``torch.save`` / ``torch.load(weights_only=True)`` without custom classes.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

LEVELS = 255  # codes span 0..255
PackedTensor = dict[str, torch.Tensor]


class QuantizationError(ValueError):
    """Non-finite input or a malformed payload: better to fail loudly than to poison the global model."""


def quantize_tensor(
    x: torch.Tensor, *, stochastic: bool = False, generator: torch.Generator | None = None
) -> PackedTensor:
    """Per-output-channel ranges keep one outlier row from flattening the resolution of all others.

    Stochastic rounding is unbiased (E[dequantized] == x), so rounding errors average out across
    clients and rounds instead of accumulating as a systematic drift.
    """
    if not x.is_floating_point():
        raise TypeError(f"can only quantize floating tensors, got {x.dtype}")
    xf = x.detach().to(torch.float32)
    if not torch.isfinite(xf).all():
        raise QuantizationError(f"cannot quantize a tensor containing NaN/Inf (shape {tuple(x.shape)})")
    rows = xf.flatten(1) if x.ndim >= 2 else xf.reshape(1, xf.numel())
    lo, hi = rows.aminmax(dim=1) if rows.numel() else (rows.new_zeros(len(rows)),) * 2
    scale = (hi - lo) / LEVELS
    if not torch.isfinite(scale).all():
        raise QuantizationError("value range too wide for float32 quantization")
    # A constant row has scale 0: divide by 1 instead, giving code 0 and an exact round trip.
    t = (rows - lo[:, None]) / torch.where(scale > 0, scale, 1.0)[:, None]
    if stochastic:
        q = (t + torch.rand(t.shape, generator=generator, device=t.device)).floor_()
    else:
        q = t.round_()
    shape = (-1,) if x.ndim >= 2 else ()
    return {
        "q": q.clamp_(0, LEVELS).to(torch.uint8).reshape(x.shape).contiguous(),
        "lo": lo.reshape(shape),
        "scale": scale.reshape(shape),
    }


def dequantize_tensor(packed: PackedTensor) -> torch.Tensor:
    """Validates first: the payload comes off the network and must not inject NaN or garbage."""
    if not isinstance(packed, Mapping) or not all(
        isinstance(packed.get(n), torch.Tensor) for n in ("q", "lo", "scale")
    ):
        raise QuantizationError("packed tensor must be a dict with tensors 'q', 'lo' and 'scale'")
    q, lo, scale = packed["q"], packed["lo"], packed["scale"]
    if q.dtype != torch.uint8:
        raise QuantizationError(f"codes must be uint8, got {q.dtype}")
    if not (lo.is_floating_point() and scale.is_floating_point()):
        raise QuantizationError(f"lo/scale must be floating, got {lo.dtype}/{scale.dtype}")
    per_channel = q.ndim >= 2 and lo.shape == scale.shape == (q.shape[0],)
    per_tensor = lo.shape == scale.shape and lo.numel() == 1 and lo.ndim <= 1
    if not (per_channel or per_tensor):
        raise QuantizationError(
            f"lo/scale shapes {tuple(lo.shape)}/{tuple(scale.shape)} do not fit codes of shape {tuple(q.shape)}"
        )
    if not (torch.isfinite(lo).all() and torch.isfinite(scale).all() and (scale >= 0).all()):
        raise QuantizationError("lo and scale must be finite, and scale non-negative")
    shape = (-1, *[1] * (q.ndim - 1)) if q.ndim >= 2 else ()
    lo, scale = (t.to(torch.float32).reshape(shape) for t in (lo, scale))
    return lo + q.to(torch.float32) * scale


def quantize_state(
    delta: Mapping[str, torch.Tensor], *, stochastic: bool = False, generator: torch.Generator | None = None
) -> dict[str, PackedTensor | torch.Tensor]:
    """Integer buffers (e.g. num_batches_tracked) are counters, not deltas: they travel as is."""
    out: dict[str, PackedTensor | torch.Tensor] = {}
    for k, v in delta.items():
        try:
            out[k] = quantize_tensor(v, stochastic=stochastic, generator=generator) if v.is_floating_point() else v
        except QuantizationError as e:
            raise QuantizationError(f"{k!r}: {e}") from None
    return out


def _dequantize_entry(v: object, ref: torch.Tensor | None) -> torch.Tensor:
    t = dequantize_tensor(v) if isinstance(v, Mapping) else v  # type: ignore[arg-type]
    if not isinstance(t, torch.Tensor):
        raise QuantizationError(f"expected a tensor or packed dict, got {type(v).__name__}")
    if ref is not None:
        if t.shape != ref.shape:
            raise QuantizationError(f"shape {tuple(t.shape)} does not match expected {tuple(ref.shape)}")
        t = t.to(ref.dtype)  # no-op (same object) when dtypes already match
    return t


def dequantize_state(
    packed: Mapping[str, object], like: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``like`` (the global state) restores dtypes and rejects updates that do not fit the model."""
    out: dict[str, torch.Tensor] = {}
    for k, v in packed.items():
        try:
            if like is not None and k not in like:
                raise QuantizationError("not present in the reference state")
            out[k] = _dequantize_entry(v, None if like is None else like[k])
        except QuantizationError as e:
            raise QuantizationError(f"{k!r}: {e}") from None
    return out


def state_delta(local: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deltas, not weights, are what quantize well; integer counters are sent as absolute values."""
    return {k: v - base[k] if v.is_floating_point() else v for k, v in local.items()}


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_delta`; keeps the base dtype so the model loads the result directly."""
    return {k: (b + delta[k]).to(b.dtype) if b.is_floating_point() else delta[k] for k, b in base.items()}


def packed_nbytes(packed: Mapping[str, object]) -> int:
    """Raw tensor payload, for reporting the compression actually achieved."""
    entries = (v.values() if isinstance(v, Mapping) else (v,) for v in packed.values())
    return sum(t.numel() * t.element_size() for e in entries for t in e if isinstance(t, torch.Tensor))
