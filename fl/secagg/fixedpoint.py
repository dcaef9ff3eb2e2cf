"""Fixed-point encoding of float updates into the ring Z_{2^k}, where secure aggregation adds.

Masks are uniform over Z_{2^k}, so what the clients mask must be ring elements: each
coordinate is clipped to ``[-clip, clip]``, scaled by ``2^f``, rounded to an integer and
stored in two's complement mod ``2^k``. The ring sum of n encodings equals their integer
sum, and so decodes, as long as that sum stays in ``[-2^(k-1), 2^(k-1))``.

**Headroom**: ``FixedPoint`` picks the largest ``f`` for which ``max_clients`` clients at the
clip bound stay within a ``2^-h`` part of that range (``h`` = ``HEADROOM_BITS``),
``max_clients * ceil(clip * 2^f) <= 2^(k-1-h) - 1``. Honest sums of n encodings then lie in
``[-reach(n), reach(n)]``, ``reach(n) = n * ceil(clip * 2^f)``, and the rest of the ring is
never reached honestly: a sum that wrapped around, or that an input outside the encoding's
range (a client that skipped its clip, or sent any ring element) pushed beyond what n
clipped inputs can make, shows as coordinates outside that window (:meth:`excess`), unless
it landed inside it, where it moves the sum no further than clipped inputs could. Without
headroom that window is the whole ring, and no sum could be told apart from an honest one.

**k = 32 by default**: a masked vector then travels as uint32, 4 bytes per coordinate, the
size of the float32 update it replaces, so secure aggregation costs no extra bandwidth;
and 32 bits leave ample precision. With the defaults (``clip`` 8, ``max_clients`` 256,
4 headroom bits, so ``f`` = 15):

- range: each client's coordinates are clipped to [-8, 8] (an update beyond that after one
  local epoch is a fault; :meth:`FixedPoint.clipped` counts the clipped coordinates so a
  caller can log them); sums of up to 256 clients decode without wrap-around;
- precision: one step is ``2^-15`` ~ 3.1e-5;
- error: per coordinate and client at most half a step (1.5e-5) with nearest rounding,
  below one step (and unbiased) with stochastic rounding; the decoded sum of n clients is
  within ``n * 2^-(f+1)`` of the sum of their clipped values. Decoding is exact in
  float64 (the integer sum times a power of two), so that bound is all the error there is.

``bits`` may be anything from 8 to 62 (values are held in int64, so sums of two ring
elements cannot overflow); above 32 the wire form is int64 and costs twice the bytes. A
federation of more than 256 clients raises ``max_clients`` (each doubling costs one
fractional bit) or ``bits``. Weighting (FedAvg's sample counts) is the caller's: scale the
delta by its weight before encoding, or send the weight as one more coordinate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MIN_BITS, MAX_BITS = 8, 62
HEADROOM_BITS = 4  # an out-of-range sum passes for an honest one with chance 2^-4 per coordinate


@dataclass(frozen=True)
class FixedPoint:
    bits: int = 32  # the ring is Z_{2^bits}
    clip: float = 8.0  # coordinates are clipped to [-clip, clip]
    max_clients: int = 256  # most encodings whose sum must still decode
    frac_bits: int = field(init=False)  # f: one step is 2^-f

    def __post_init__(self) -> None:
        if type(self.bits) is not int or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip!r}")
        if type(self.max_clients) is not int or self.max_clients < 1:
            raise ValueError(f"max_clients must be a positive int, got {self.max_clients!r}")
        limit = (1 << (self.bits - 1 - HEADROOM_BITS)) - 1
        f = self.bits - 1
        while f >= 0 and self.max_clients * math.ceil(self.clip * 2.0**f) > limit:
            f -= 1
        if f < 0:
            raise ValueError(f"{self.bits} bits cannot hold the sum of {self.max_clients} clients clipped to "
                             f"{self.clip} with {HEADROOM_BITS} bits of headroom")
        object.__setattr__(self, "frac_bits", f)

    @property
    def step(self) -> float:
        """The value of one unit in the ring: ``2^-f``."""
        return 2.0**-self.frac_bits

    def clipped(self, x: torch.Tensor) -> int:
        """How many coordinates of ``x`` encoding would clip."""
        return int((x.detach().abs() > self.clip).sum())

    def encode(
        self, x: torch.Tensor, *, stochastic: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A float vector (any shape; flattened) as int64 ring elements in ``[0, 2^bits)``.

        Non-finite input is refused: one NaN would silently corrupt everybody's sum."""
        if not x.is_floating_point():
            raise TypeError(f"can only encode floating tensors, got {x.dtype}")
        v = x.detach().reshape(-1).to(torch.float64)  # float32 * 2^f is exact in float64
        if not torch.isfinite(v).all():
            raise ValueError("cannot encode a vector containing NaN/Inf")
        v = v.clamp(-self.clip, self.clip).mul_(2.0**self.frac_bits)
        if stochastic:
            v.add_(torch.rand(v.shape, dtype=torch.float64, generator=generator)).floor_()
        else:
            v.round_()
        return v.to(torch.int64).bitwise_and_((1 << self.bits) - 1)

    def reach(self, count: int) -> int:
        """The largest magnitude, in steps, of a coordinate of the sum of ``count`` encodings."""
        return count * math.ceil(self.clip * 2.0**self.frac_bits)

    def excess(self, total: torch.Tensor, count: int) -> int:
        """How many coordinates of a ring sum of ``count`` inputs lie beyond :meth:`reach`:
        none for encodings; any is an input that was not one (or a wrapped sum)."""
        return int((self._signed(total, count).abs() > self.reach(count)).sum())

    def decode(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """The float64 vector of a ring sum of ``count`` encodings (``count`` checks that the
        sum cannot have wrapped around)."""
        return self._signed(total, count).to(torch.float64).mul_(2.0**-self.frac_bits)

    def _signed(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """The ring sum in two's complement, once checked."""
        if type(count) is not int or not 1 <= count <= self.max_clients:
            raise ValueError(f"count must be in [1, {self.max_clients}] (max_clients), got {count!r}")
        if total.dtype != torch.int64 or total.ndim != 1:
            raise ValueError(f"a ring vector is 1-D int64, got {total.dtype}{list(total.shape)}")
        if total.numel() and (int(total.min()) < 0 or int(total.max()) >> self.bits):
            raise ValueError(f"ring values must lie in [0, 2^{self.bits})")
        return total - ((total >> (self.bits - 1)) << self.bits)
