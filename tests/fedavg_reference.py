"""FedAvg as a reference for the tests: a running sample-weighted mean of client states,
computed the plain way, to check the server's streaming aggregation against."""
from __future__ import annotations

from typing import Sequence

import torch

from fl.common.layout import Layout, State
from fl.common.vectors import FOLD_SLICE, InvalidUpdate, fold


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
            fold(dst[e.offset:e.offset + e.numel], state[e.name].detach().to("cpu").reshape(-1), num_samples)
        self._end(num_samples)

    def add_flat(self, floats: torch.Tensor, ints: torch.Tensor, num_samples: int) -> None:
        """Fold a (validated) update in its flat form: ``Layout.unpack``'s vectors."""
        acc_floats, acc_ints = self._begin(num_samples)
        fold(acc_floats, floats, num_samples)
        fold(acc_ints, ints, num_samples)
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
        for i in range(0, floats.numel(), FOLD_SLICE):  # slices: no float64 model-sized temporary
            floats[i:i + FOLD_SLICE] = self._floats[i:i + FOLD_SLICE] / self.total_weight
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
