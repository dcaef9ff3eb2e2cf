from __future__ import annotations

import io
import math

import pytest
import torch

from fl.learning.model import ImprovedCNN
from fl.learning.quantization import (
    QuantizationError,
    apply_delta,
    dequantize_state,
    dequantize_tensor,
    packed_nbytes,
    quantize_state,
    quantize_tensor,
    state_delta,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _step(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """Quantization step broadcast to the shape of the codes."""
    q, scale = packed["q"], packed["scale"]
    return scale.reshape(-1, *[1] * (q.ndim - 1)) if q.ndim >= 2 else scale.reshape(())


def _slack(x: torch.Tensor) -> float:
    return 1e-6 * (1.0 + x.abs().max().item())  # float32 rounding in (x - lo) / scale and lo + q * scale


@pytest.mark.parametrize("shape", [(32, 1, 3, 3), (128, 3136), (10,), ()])
def test_nearest_round_trip_within_half_step(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=_gen()) * 3 + 1
    packed = quantize_tensor(x)
    q, lo, scale = packed["q"], packed["lo"], packed["scale"]
    assert q.dtype == torch.uint8 and q.shape == x.shape and q.is_contiguous()
    assert lo.dtype == scale.dtype == torch.float32
    assert lo.shape == scale.shape == ((shape[0],) if len(shape) >= 2 else ())
    y = dequantize_tensor(packed)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y - x).abs() <= _step(packed) / 2 + _slack(x)).all()


def test_stochastic_rounding_is_unbiased_and_seeded() -> None:
    x = torch.randn(4, 25, generator=_gen(1))
    g, n = _gen(2), 2000
    draws = torch.stack([dequantize_tensor(quantize_tensor(x, stochastic=True, generator=g)) for _ in range(n)])
    step = _step(quantize_tensor(x))
    tol = 5 * step / math.sqrt(n)
    assert ((draws.mean(0) - x).abs() <= tol + _slack(x)).all()
    assert ((draws - x).abs() < step + _slack(x)).all()
    # The tolerance is tight enough to catch the bias of nearest rounding.
    assert ((dequantize_tensor(quantize_tensor(x)) - x).abs() > tol).any()

    codes = [quantize_tensor(x, stochastic=True, generator=_gen(s))["q"] for s in (7, 7, 8)]
    assert torch.equal(codes[0], codes[1])
    assert not torch.equal(codes[0], codes[2])


@pytest.mark.parametrize("stochastic", [False, True])
def test_constant_slices_round_trip_exactly(stochastic: bool) -> None:
    flat = torch.full((3, 4), 0.37)
    per_channel = torch.randn(4, 10, generator=_gen())
    per_channel[2] = -1.25
    for x in (flat, per_channel, torch.tensor(2.5), torch.full((5,), -3.0)):
        packed = quantize_tensor(x, stochastic=stochastic, generator=_gen())
        y = dequantize_tensor(packed)
        assert not y.isnan().any()
        if x is per_channel:
            assert packed["scale"][2] == 0 and torch.equal(y[2], x[2])
            assert ((y - x).abs() <= _step(packed) + _slack(x)).all()
        else:
            assert torch.equal(y, x) and (packed["scale"] == 0).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises(bad: float) -> None:
    x = torch.randn(3, 4, generator=_gen())
    x[1, 2] = bad
    with pytest.raises(QuantizationError, match="NaN/Inf"):
        quantize_tensor(x)
    with pytest.raises(QuantizationError, match="'w'"):
        quantize_state({"w": x})


def test_integer_buffers_pass_through_untouched() -> None:
    count, flags = torch.tensor(7, dtype=torch.int64), torch.tensor([True, False])
    state = {"w": torch.randn(3, 3, generator=_gen()), "n": count, "flags": flags}
    packed = quantize_state(state)
    assert packed["n"] is count and packed["flags"] is flags
    assert isinstance(packed["w"], dict) and not any(isinstance(v, dict) for v in state.values())
    for out in (dequantize_state(packed), dequantize_state(packed, like=state)):
        assert out["n"] is count and out["n"].dtype == torch.int64 and out["flags"] is flags
    assert dequantize_state(packed, like={**state, "w": state["w"].double()})["w"].dtype == torch.float64


def test_packed_nbytes_counts_codes_and_per_channel_params() -> None:
    packed = quantize_state({"w": torch.randn(4, 5, generator=_gen()), "n": torch.tensor(1)})
    assert packed_nbytes(packed) == 4 * 5 + 2 * 4 * 4 + 8


def _saved_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _model_states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    base = ImprovedCNN().state_dict()
    g = _gen(3)
    local = {
        k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 5
        for k, v in base.items()
    }
    return base, local


def test_model_state_round_trip_and_payload_size() -> None:
    base, local = _model_states()
    delta = state_delta(local, base)
    packed = quantize_state(delta)
    blob = _saved_bytes(packed)
    assert len(blob) <= 0.27 * len(_saved_bytes(delta))

    loaded = torch.load(io.BytesIO(blob), weights_only=True)
    restored = dequantize_state(loaded, like=base)
    assert list(restored) == list(base)
    for k, v in restored.items():
        assert v.dtype == base[k].dtype and v.shape == base[k].shape
        if v.is_floating_point():
            assert ((v - delta[k]).abs() <= _step(packed[k]) / 2 + _slack(delta[k])).all(), k
        else:
            assert torch.equal(v, local[k]), k
    assert packed_nbytes(packed) < 0.26 * sum(t.numel() * 4 for t in delta.values())


def test_dequantize_state_rejects_malformed_data() -> None:
    like = {"w": torch.randn(4, 6, generator=_gen())}
    good = quantize_state(like)["w"]
    nan_scale = good["scale"].clone()
    nan_scale[0] = math.nan
    bad_entries = [
        {**good, "q": good["q"].to(torch.int16)},
        {**good, "scale": -good["scale"]},
        {**good, "scale": nan_scale},
        {**good, "lo": good["lo"][:2]},
        {"q": good["q"], "lo": good["lo"]},
    ]
    for entry in bad_entries:
        with pytest.raises(QuantizationError, match="'w'"):
            dequantize_state({"w": entry})
    with pytest.raises(QuantizationError, match="shape"):
        dequantize_state({"w": good}, like={"w": torch.zeros(4, 7)})
    with pytest.raises(QuantizationError):
        dequantize_state({"w": good}, like={"v": like["w"]})
    assert torch.isfinite(dequantize_state({"w": good}, like=like)["w"]).all()


def test_state_delta_and_apply_delta_are_inverse() -> None:
    base, local = _model_states()
    delta = state_delta(local, base)
    assert torch.equal(delta["features.1.num_batches_tracked"], local["features.1.num_batches_tracked"])
    rebuilt = apply_delta(base, delta)
    assert list(rebuilt) == list(local)
    for k, v in rebuilt.items():
        assert v.dtype == local[k].dtype
        torch.testing.assert_close(v, local[k], rtol=0, atol=1e-6)
