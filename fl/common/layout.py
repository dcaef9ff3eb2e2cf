"""A state_dict's layout, and the state in flat form: the form float updates travel in.

``torch.load(weights_only=True)`` runs a pure-Python unpickler, about 25 pickle ops and a
storage record per tensor, so the 18-tensor ImprovedCNN state_dict decodes far slower than
the same numbers as one float32 vector (plus the two integer counters as a list).
One vector also validates and folds in one call instead of one per tensor. That is the
server's per-update work, so float updates travel flat; the MODEL broadcast stays a plain
state_dict.

Both ends derive the layout (names, shapes, dtypes, in ``state_dict`` order) from the same
model, and the packed form carries a fingerprint of it, so a vector from another model is
refused instead of misread.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch

State = Mapping[str, torch.Tensor]
FLOAT = torch.float32  # the wire dtype of every floating entry
INT = torch.int64  # ... and of every integer one (BatchNorm's num_batches_tracked)


class LayoutError(ValueError):
    """A packed state that does not fit the layout (another model, wrong sizes or types)."""


@dataclass(frozen=True)
class Entry:
    name: str
    shape: torch.Size
    dtype: torch.dtype
    offset: int  # into the float vector for floating entries, else into the int vector
    numel: int


@dataclass(frozen=True)
class Layout:
    entries: tuple[Entry, ...]
    float_numel: int
    int_numel: int
    fingerprint: int

    @classmethod
    def of(cls, state: State) -> "Layout":
        entries, sizes = [], {True: 0, False: 0}
        for name, t in state.items():
            floating = t.is_floating_point()
            entries.append(Entry(name, t.shape, t.dtype, sizes[floating], t.numel()))
            sizes[floating] += t.numel()
        spec = ";".join(f"{e.name}:{str(e.dtype)}:{tuple(e.shape)}" for e in entries)
        fingerprint = int.from_bytes(hashlib.sha256(spec.encode()).digest()[:8], "big") >> 1
        return cls(tuple(entries), sizes[True], sizes[False], fingerprint)

    def flatten(self, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """The float and int vectors of ``state`` (one copy; keys must match the layout)."""
        floats = torch.empty(self.float_numel, dtype=FLOAT)
        ints = torch.empty(self.int_numel, dtype=INT)
        for e in self.entries:
            dst = floats if e.dtype.is_floating_point else ints
            dst[e.offset:e.offset + e.numel] = state[e.name].detach().reshape(-1)
        return floats, ints

    def unflatten(self, floats: torch.Tensor, ints: torch.Tensor) -> dict[str, torch.Tensor]:
        """A state_dict over the vectors: views where the dtype matches, so a model loads
        it, and ``torch.save`` writes one storage record, not one per tensor."""
        out = {}
        for e in self.entries:
            src = floats if e.dtype.is_floating_point else ints
            out[e.name] = src[e.offset:e.offset + e.numel].view(e.shape).to(e.dtype)
        return out

    def pack(self, state: State) -> dict[str, Any]:
        """The wire form. The few integer counters travel as a list of ints: one tensor
        fewer for the unpickler to rebuild, about a fifth of the decoding time."""
        floats, ints = self.flatten(state)
        return {"layout": self.fingerprint, "float": floats, "int": ints.tolist()}

    def unpack(self, packed: object) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors of a packed state from the network, checked against this layout
        (values are not looked at: see ``fl.server.contribution.validate_flat``)."""
        if not isinstance(packed, Mapping) or set(packed) != {"layout", "float", "int"}:
            raise LayoutError("a packed state is a dict of exactly 'layout', 'float' and 'int'")
        fingerprint, floats, ints = packed["layout"], packed["float"], packed["int"]
        if type(fingerprint) is not int or fingerprint != self.fingerprint:
            raise LayoutError("packed for a different model (layout fingerprint differs)")
        if not isinstance(floats, torch.Tensor) or floats.dtype != FLOAT or floats.shape != (self.float_numel,):
            got = f"{floats.dtype}{list(floats.shape)}" if isinstance(floats, torch.Tensor) else type(floats).__name__
            raise LayoutError(f"float vector is {got}, expected {FLOAT}[{self.float_numel}]")
        if not isinstance(ints, list) or len(ints) != self.int_numel or \
                not all(type(i) is int and -(1 << 63) <= i < (1 << 63) for i in ints):
            raise LayoutError(f"int entries must be a list of {self.int_numel} 64-bit ints")
        return floats, torch.tensor(ints, dtype=INT)
