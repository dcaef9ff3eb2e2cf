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

from typing import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


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


_FOLD_SLICE = 1 << 16  # elements: 512 KiB of float64


class FedAvg:
    """Running sample-weighted sum of client states; ``result()`` is the FedAvg model."""

    def __init__(self, reference: State) -> None:
        self._ref = {k: (v.dtype, v.shape) for k, v in reference.items()}
        self._sum = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in reference.items()}
        self.total_weight = 0
        self.count = 0

    def add(self, state: State, num_samples: int) -> None:
        if num_samples <= 0:
            raise InvalidUpdate(f"sample count must be positive, got {num_samples}")
        for name, acc in self._sum.items():
            # Folded in slices: the float64 cast of a slice is a small temporary, where a
            # whole-tensor cast would allocate (and free) a model-sized one per update.
            src, dst = state[name].detach().to("cpu").reshape(-1), acc.view(-1)
            for i in range(0, src.numel(), _FOLD_SLICE):
                dst[i:i + _FOLD_SLICE].add_(src[i:i + _FOLD_SLICE].to(torch.float64), alpha=num_samples)
        self.total_weight += num_samples
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no updates to average")
        if self._sum is None:
            raise ValueError("the sums were released")
        out = {}
        for name, acc in self._sum.items():
            dtype, shape = self._ref[name]
            out[name] = mean = torch.empty(shape, dtype=dtype)
            src, dst = acc.view(-1), mean.view(-1)
            for i in range(0, src.numel(), _FOLD_SLICE):  # slices: no float64 model-sized temporary
                part = src[i:i + _FOLD_SLICE] / self.total_weight
                dst[i:i + _FOLD_SLICE] = part if dtype.is_floating_point else part.round()
        return out

    def release(self) -> None:
        """Free the running sums once the average is taken; count and total_weight stay."""
        self._sum = None


def fedavg(updates: Sequence[tuple[State, int]]) -> dict[str, torch.Tensor]:
    """FedAvg of (state, sample count) pairs: the batch form of :class:`FedAvg`."""
    if not updates:
        raise ValueError("no updates to average")
    acc = FedAvg(updates[0][0])
    for state, num_samples in updates:
        acc.add(state, num_samples)
    return acc.result()
