"""Checks on one client's contribution before it may enter an aggregate."""
from __future__ import annotations

from typing import Mapping

import torch

from fl.common.layout import State
from fl.common.vectors import InvalidUpdate
from fl.common.vectors import finite as _finite


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


def validate_num_samples(num_samples: object, limit: int) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 0 < num_samples <= limit:
        raise InvalidUpdate(f"implausible sample count {num_samples!r} (expected 1..{limit})")
    return num_samples


def validate_flat(floats: torch.Tensor) -> None:
    """The float vector of a packed update (shapes are checked by ``Layout.unpack``)."""
    if floats.numel() and not _finite(floats):
        raise InvalidUpdate("update holds NaN or Inf")
