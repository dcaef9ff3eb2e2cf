"""FedAvg as small pure functions: validate an update, fold it into a running sum, average.

The server folds each update into one accumulator the moment it arrives, so memory stays
at one model-sized sum however many clients report, and no list of states is ever held.

Floating tensors are averaged with weights proportional to the clients' sample counts
(sums kept in float64, so the order of arrival does not change the result). Integer
buffers (BatchNorm's ``num_batches_tracked``) are counters, not parameters: they get the
same weighted mean, rounded to the nearest integer and kept in their integer dtype, which
is what the averaged model has "seen" on a typical client.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from layout import Layout, State


class InvalidUpdate(ValueError):
    """An update that must not enter the average (wrong keys, shapes, dtypes or values)."""


def validate_state(state: Mapping[str, object], reference: State) -> None:
    """Exact keys, shapes and dtypes of the global model, and only finite values."""
    if not isinstance(state, Mapping):
        raise InvalidUpdate(f"update is a {type(state).__name__}, not a state dict")
    missing = reference.keys() - state.keys()
    extra = state.keys() - reference.keys()
    if missing or extra:
        raise InvalidUpdate(f"keys differ from the model: missing {sorted(missing)[:3]}, extra {sorted(map(str, extra))[:3]}")
    for name, ref in reference.items():
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise InvalidUpdate(f"{name} is a {type(value).__name__}, not a tensor")
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise InvalidUpdate(f"{name} is {value.dtype}{list(value.shape)}, expected {ref.dtype}{list(ref.shape)}")
        if value.is_floating_point() and value.numel() and not _finite(value):
            raise InvalidUpdate(f"{name} holds NaN or Inf")


def _finite(value: torch.Tensor) -> bool:
    """All values finite: min and max propagate NaN and show +-Inf, so one reduction
    without a bool tensor the size of the input (~4x faster than isfinite().all())."""
    lo, hi = torch.aminmax(value)
    return bool(lo.isfinite() & hi.isfinite())


def validate_num_samples(num_samples: object, limit: int) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 0 < num_samples <= limit:
        raise InvalidUpdate(f"implausible sample count {num_samples!r} (expected 1..{limit})")
    return num_samples


def validate_flat(floats: torch.Tensor) -> None:
    """The float vector of a packed update (shapes are checked by ``Layout.unpack``)."""
    if floats.numel() and not _finite(floats):
        raise InvalidUpdate("update holds NaN or Inf")


_FOLD_SLICE = 1 << 17  # elements: a 1 MiB float64 temporary at most


def _fold(dst: torch.Tensor, src: torch.Tensor, weight: int) -> None:
    """dst += weight * src in slices: torch casts a float32 operand of a float64 add to a
    float64 temporary of its full size, so whole-vector adds would allocate one per update."""
    for i in range(0, src.numel(), _FOLD_SLICE):
        dst[i:i + _FOLD_SLICE].add_(src[i:i + _FOLD_SLICE], alpha=weight)


class FedAvg:
    """Running sample-weighted sum of client states; ``result()`` is the FedAvg model.

    The sums are two flat float64 vectors in the reference's layout (floating entries,
    integer entries), so a flat update (``add_flat``) folds in with a handful of calls.
    """

    def __init__(self, reference: State) -> None:
        self.layout = Layout.of(reference)
        self._floats = torch.zeros(self.layout.float_numel, dtype=torch.float64)
        self._ints = torch.zeros(self.layout.int_numel, dtype=torch.float64)
        self.total_weight = 0
        self.count = 0

    def add(self, state: State, num_samples: int) -> None:
        """Fold a (validated) state_dict, entry by entry: no flattened copy of it is made."""
        floats, ints = self._begin(num_samples)
        for e in self.layout.entries:
            dst = floats if e.dtype.is_floating_point else ints
            _fold(dst[e.offset:e.offset + e.numel], state[e.name].detach().to("cpu").reshape(-1), num_samples)
        self._end(num_samples)

    def add_flat(self, floats: torch.Tensor, ints: torch.Tensor, num_samples: int) -> None:
        """Fold a (validated) update in its flat form: ``Layout.unpack``'s vectors."""
        acc_floats, acc_ints = self._begin(num_samples)
        _fold(acc_floats, floats, num_samples)
        _fold(acc_ints, ints, num_samples)
        self._end(num_samples)

    def _begin(self, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        if num_samples <= 0:
            raise InvalidUpdate(f"sample count must be positive, got {num_samples}")
        return self._floats, self._ints

    def _end(self, num_samples: int) -> None:
        self.total_weight += num_samples
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The weighted mean as a state_dict whose float32 entries share one storage."""
        if self.count == 0:
            raise ValueError("no updates to average")
        wide = any(e.dtype == torch.float64 for e in self.layout.entries)  # float32 would truncate those
        floats = torch.empty(self.layout.float_numel, dtype=torch.float64 if wide else torch.float32)
        for i in range(0, floats.numel(), _FOLD_SLICE):  # slices: no float64 model-sized temporary
            floats[i:i + _FOLD_SLICE] = self._floats[i:i + _FOLD_SLICE] / self.total_weight
        ints = (self._ints / self.total_weight).round().to(torch.int64)
        return self.layout.unflatten(floats, ints)

    def reset(self) -> None:
        """Start a new average in the same memory (the server keeps one for the whole run)."""
        self._floats.zero_()
        self._ints.zero_()
        self.total_weight = 0
        self.count = 0


def fedavg(updates: Sequence[tuple[State, int]]) -> dict[str, torch.Tensor]:
    """FedAvg of (state, sample count) pairs: the batch form of :class:`FedAvg`."""
    if not updates:
        raise ValueError("no updates to average")
    acc = FedAvg(updates[0][0])
    for state, num_samples in updates:
        acc.add(state, num_samples)
    return acc.result()


def l2_norm(t: torch.Tensor) -> float:
    """The L2 norm of all of ``t``'s values, accumulated in float64 (in slices, so a float32
    input is never copied whole to float64). NaN or Inf anywhere gives a non-finite result."""
    flat = t.detach().reshape(-1)
    total = 0.0
    for i in range(0, flat.numel(), _FOLD_SLICE):
        part = flat[i:i + _FOLD_SLICE].to(torch.float64)
        total += float(torch.dot(part, part))
    return math.sqrt(total)


def clip_by_norm(delta: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, float]:
    """``delta`` scaled down to an L2 norm of at most ``max_norm`` (up to the rounding of its
    dtype, ~1e-7 relative for float32), and its original norm.

    At or below ``max_norm`` the very same tensor comes back (no copy); above, a new one
    ``delta * (max_norm / norm)``. A NaN or Inf anywhere in it raises :class:`InvalidUpdate`:
    such a vector has no direction to keep.
    """
    if not 0 < max_norm < math.inf:
        raise ValueError(f"max_norm must be positive and finite, got {max_norm!r}")
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise InvalidUpdate(f"update norm is {norm} (it holds NaN or Inf)")
    if norm <= max_norm:
        return delta, norm
    return delta * (max_norm / norm), norm
