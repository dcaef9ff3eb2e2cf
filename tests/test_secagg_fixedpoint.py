from __future__ import annotations

import math

import pytest
import torch

from fl.secagg.fixedpoint import HEADROOM_BITS, FixedPoint


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits, clip, max_clients", [(32, 8.0, 256), (32, 1.0, 1000), (16, 0.5, 10), (62, 8.0, 1 << 20)])
def test_frac_bits_is_the_largest_that_cannot_overflow(bits: int, clip: float, max_clients: int) -> None:
    fp = FixedPoint(bits, clip, max_clients)
    limit = (1 << (bits - 1 - HEADROOM_BITS)) - 1
    assert max_clients * math.ceil(clip * 2.0**fp.frac_bits) <= limit
    assert max_clients * math.ceil(clip * 2.0 ** (fp.frac_bits + 1)) > limit


def test_defaults() -> None:
    fp = FixedPoint()
    assert (fp.bits, fp.clip, fp.max_clients, fp.frac_bits) == (32, 8.0, 256, 15)
    assert fp.step == 2.0**-15


@pytest.mark.parametrize("bits", [16, 32, 40, 62])
def test_sum_of_encodings_decodes_within_the_bound(bits: int) -> None:
    fp = FixedPoint(bits=bits, clip=2.0, max_clients=20)
    xs = [torch.randn(5000, generator=_gen(i)) for i in range(20)]
    total = torch.zeros(5000, dtype=torch.int64)
    for x in xs:
        code = fp.encode(x)
        assert code.dtype == torch.int64 and int(code.min()) >= 0 and int(code.max()) < 1 << bits
        assert (fp.decode(code, 1) - x.double().clamp(-2, 2)).abs().max() <= fp.step / 2
        total = (total + code) & ((1 << bits) - 1)
    exact = sum(x.double().clamp(-2, 2) for x in xs)
    err = (fp.decode(total, 20) - exact).abs().max().item()
    assert err <= 20 * fp.step / 2  # each of the 20 encodings rounds to the nearest step
    assert err > 0 or bits == 62  # the bound is not vacuous: rounding does happen


def test_extremes_of_max_clients_do_not_wrap() -> None:
    fp = FixedPoint(bits=32, clip=8.0, max_clients=256)
    for value in (8.0, -8.0, 1e9, -1e9):
        code = fp.encode(torch.full((3,), value))
        total = (code * 256) & 0xFFFFFFFF
        assert torch.equal(fp.decode(total, 256), torch.full((3,), 256 * math.copysign(8.0, value), dtype=torch.float64))


def test_stochastic_rounding_is_unbiased_and_within_one_step() -> None:
    fp = FixedPoint(bits=16, clip=1.0, max_clients=4)  # a coarse step makes bias visible
    x = torch.rand(200, generator=_gen(1)) * 2 - 1
    g, n = _gen(2), 2000
    draws = torch.stack([fp.decode(fp.encode(x, stochastic=True, generator=g), 1) for _ in range(n)])
    assert ((draws - x.double()).abs() < fp.step).all()
    tol = 5 * fp.step / math.sqrt(n)
    assert ((draws.mean(0) - x.double()).abs() <= tol).all()
    assert ((fp.decode(fp.encode(x), 1) - x.double()).abs() > tol).any()  # nearest is biased


def test_clipping_is_counted() -> None:
    fp = FixedPoint(clip=1.0)
    x = torch.tensor([0.5, -2.0, 3.0, 1.0])
    assert fp.clipped(x) == 2
    assert fp.decode(fp.encode(x), 1).tolist() == [0.5, -1.0, 1.0, 1.0]


def test_refuses_bad_input() -> None:
    fp = FixedPoint()
    with pytest.raises(ValueError, match="NaN"):
        fp.encode(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN"):
        fp.encode(torch.tensor([float("inf")]))
    with pytest.raises(TypeError):
        fp.encode(torch.tensor([1, 2]))
    code = fp.encode(torch.zeros(3))
    with pytest.raises(ValueError, match="count"):
        fp.decode(code, 257)
    with pytest.raises(ValueError, match="count"):
        fp.decode(code, 0)
    with pytest.raises(ValueError, match="lie in"):
        fp.decode(code + (1 << 32), 1)
    with pytest.raises(ValueError, match="1-D int64"):
        fp.decode(code.to(torch.int32), 1)


@pytest.mark.parametrize("kwargs", [{"bits": 7}, {"bits": 63}, {"clip": 0.0}, {"clip": float("inf")}, {"max_clients": 0},
                                    {"bits": 8, "clip": 100.0, "max_clients": 10}])
def test_refuses_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FixedPoint(**kwargs)


def test_honest_sums_stay_within_reach_and_reach_leaves_headroom() -> None:
    """Clients at the clip bound reach exactly ``reach(n)``, which uses at most a 2^-h part
    of the signed range: the rest of the ring is what only a bad input can reach."""
    fp = FixedPoint(bits=32, clip=1.0, max_clients=10)
    assert HEADROOM_BITS >= 2 and fp.reach(10) < 1 << (31 - HEADROOM_BITS)
    for n in (1, 3, 10):
        for value in (1.0, -1.0, 5.0, -5.0):  # beyond the clip: encoding clamps it
            total = (fp.encode(torch.full((4,), value)) * n) & 0xFFFFFFFF
            assert fp.excess(total, n) == 0
            assert int(fp._signed(total, n).abs().max()) == fp.reach(n)


def test_an_unclipped_input_is_out_of_reach() -> None:
    """Nine clipped inputs plus one that skipped the coordinate clip (a client's own ring
    element of 100 at clip 1): the coordinates it pushed beyond what ten clipped inputs can
    reach are counted; the clipped ones are not."""
    fp = FixedPoint(bits=32, clip=1.0, max_clients=10)
    honest = [fp.encode(torch.rand(1000, generator=_gen(i)) * 2 - 1) for i in range(9)]
    cheat = torch.zeros(1000, dtype=torch.int64)
    cheat[:10] = int(100 * 2**fp.frac_bits)  # 100 * 2^f < 2^31: no wrap of its own
    total = torch.zeros(1000, dtype=torch.int64)
    for x in [*honest, cheat]:
        total = (total + x) & 0xFFFFFFFF
    assert fp.excess(total, 10) == 10
    assert fp.excess((total - cheat) & 0xFFFFFFFF, 9) == 0


def test_a_wrapped_or_garbage_sum_is_out_of_reach() -> None:
    """A uniform ring vector (a wrong mask, a sum that wrapped) lies beyond reach in all but
    about 2^-h of its coordinates."""
    fp = FixedPoint(bits=32, clip=8.0, max_clients=256)
    garbage = torch.randint(0, 1 << 32, (100_000,), generator=_gen(3), dtype=torch.int64)
    share = fp.excess(garbage, 256) / garbage.numel()
    inside = 2 * fp.reach(256) / 2**32
    assert inside <= 2.0**-HEADROOM_BITS
    assert abs(share - (1 - inside)) < 0.01


def test_excess_refuses_what_decode_refuses() -> None:
    fp = FixedPoint(bits=16, clip=1.0, max_clients=4)
    with pytest.raises(ValueError, match="count"):
        fp.excess(torch.zeros(3, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="ring values"):
        fp.excess(torch.tensor([1 << 16]), 2)
