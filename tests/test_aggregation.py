from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from fedavg_reference import FedAvg, fedavg

from fl.common.layout import Layout
from fl.common.vectors import InvalidUpdate, clip_by_norm, l2_norm
from fl.learning.model import ImprovedCNN
from fl.server.contribution import validate_flat, validate_num_samples, validate_state


def make_state(seed: int, nbt: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(nbt, dtype=torch.int64),
    }


@functools.lru_cache(maxsize=None)
def _model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = ImprovedCNN()
    with torch.no_grad():
        for t in m.state_dict().values():  # distinct values per seed, BN buffers included
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                t.fill_(seed + 1)
    return m.state_dict()


def model_state(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _model_state(seed).items()}


# --- fedavg -----------------------------------------------------------------------------

def test_weights_one_and_three_give_exact_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0, -4.0, 0.5])}
    b = {"w": torch.tensor([5.0, 10.0, 8.0, 2.5])}
    out = fedavg([(a, 1), (b, 3)])
    assert torch.equal(out["w"], (a["w"] + 3 * b["w"]) / 4)
    assert torch.equal(out["w"], torch.tensor([4.0, 8.0, 5.0, 2.0]))


def test_three_clients_unequal_counts_random_values():
    states = [make_state(i) for i in range(3)]
    counts = [100, 250, 37]
    out = fedavg(list(zip(states, counts)))
    total = sum(counts)
    for k in ("w", "b"):
        expected = sum(s[k].double() * n for s, n in zip(states, counts)) / total
        assert out[k].dtype == torch.float32
        assert torch.equal(out[k], expected.float())
        # and not the unweighted mean
        assert not torch.allclose(out[k], sum(s[k] for s in states) / 3)


def test_single_update_is_identity():
    s = model_state(0)
    out = fedavg([(s, 17)])
    assert out.keys() == s.keys()
    for k in s:
        assert out[k].dtype == s[k].dtype
        assert torch.equal(out[k], s[k]), k


def test_identical_states_average_to_themselves():
    s = model_state(1)
    out = fedavg([(s, 1), (s, 5), (s, 100)])
    for k in s:
        assert torch.allclose(out[k].double(), s[k].double(), rtol=0, atol=1e-6), k


def test_streaming_equals_batch_regardless_of_order():
    states = [make_state(i, nbt=10 * i + 3) for i in range(4)]
    counts = [3, 11, 1, 40]
    batch = fedavg(list(zip(states, counts)))
    for perm in itertools.permutations(range(4)):
        acc = FedAvg(states[0])
        for i in perm:
            acc.add(states[i], counts[i])
        out = acc.result()
        assert acc.count == 4 and acc.total_weight == sum(counts)
        for k in batch:
            assert out[k].dtype == batch[k].dtype
            assert torch.equal(out[k], batch[k]), (perm, k)


def test_streaming_equals_batch_on_real_model_states():
    states = [model_state(i) for i in range(3)]
    counts = [600, 1200, 300]
    batch = fedavg(list(zip(states, counts)))
    acc = FedAvg(states[0])
    for i in (2, 0, 1):
        acc.add(states[i], counts[i])
    out = acc.result()
    for k in batch:
        assert torch.equal(out[k], batch[k]), k
    ImprovedCNN().load_state_dict(out)  # still a valid model state


def test_integer_buffer_weighted_mean_rounded_keeps_int64():
    a = make_state(0, nbt=10)
    b = make_state(1, nbt=21)
    out = fedavg([(a, 1), (b, 3)])  # (10 + 63) / 4 = 18.25 -> 18
    nbt = out["bn.num_batches_tracked"]
    assert nbt.dtype == torch.int64
    assert nbt.shape == ()
    assert int(nbt) == 18
    out = fedavg([(a, 1), (b, 1), (make_state(2, nbt=30), 2)])  # (10+21+60)/4 = 22.75 -> 23
    assert int(out["bn.num_batches_tracked"]) == 23


def test_integer_buffer_large_values_exact():
    big = 2**40 + 1
    a = {"n": torch.tensor(big, dtype=torch.int64)}
    out = fedavg([(a, 7), (a, 9)])
    assert out["n"].dtype == torch.int64 and int(out["n"]) == big


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_dtype_preserved(dtype):
    a = {"w": torch.tensor([1.0, 2.0], dtype=dtype)}
    b = {"w": torch.tensor([3.0, 6.0], dtype=dtype)}
    out = fedavg([(a, 1), (b, 1)])
    assert out["w"].dtype == dtype
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0], dtype=dtype))


def test_result_does_not_alias_inputs_or_accumulator():
    a = make_state(0)
    acc = FedAvg(a)
    acc.add(a, 2)
    out = acc.result()
    out["w"].add_(100.0)
    assert not torch.equal(a["w"], out["w"])
    assert torch.equal(acc.result()["w"], a["w"])  # accumulator untouched by edits to a result


def test_add_does_not_modify_client_state():
    a = make_state(0)
    before = {k: v.clone() for k, v in a.items()}
    acc = FedAvg(a)
    acc.add(a, 5)
    acc.add(a, 7)
    for k in a:
        assert torch.equal(a[k], before[k])


def test_accumulator_memory_constant_in_number_of_updates():
    ref = model_state(0)
    acc = FedAvg(ref)
    floats, ints = acc._floats, acc._ints
    layout = Layout.of(ref)
    for i in range(20):
        if i % 2:
            acc.add(ref, i + 1)
        else:
            acc.add_flat(*layout.flatten(ref), i + 1)
    assert acc.count == 20
    assert acc.total_weight == sum(range(1, 21))
    assert acc._floats is floats and acc._ints is ints  # accumulated in place, no new tensors per update
    assert floats.dtype == torch.float64 and floats.numel() == sum(v.numel() for v in ref.values() if v.is_floating_point())
    # nothing else on the object grows with the number of updates
    for name, value in vars(acc).items():
        if isinstance(value, (list, tuple, dict, set)):
            assert len(value) <= len(ref), name


def test_flat_and_state_dict_updates_fold_identically():
    states = [model_state(i) for i in range(3)]
    counts = [100, 250, 37]
    layout = Layout.of(states[0])
    by_dict, by_flat, mixed = FedAvg(states[0]), FedAvg(states[0]), FedAvg(states[0])
    for i, (s, n) in enumerate(zip(states, counts)):
        by_dict.add(s, n)
        by_flat.add_flat(*layout.flatten(s), n)
        mixed.add(s, n) if i % 2 else mixed.add_flat(*layout.unpack(layout.pack(s)), n)
    a, b, c = by_dict.result(), by_flat.result(), mixed.result()
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
    expected = sum(s["features.0.weight"].double() * n for s, n in zip(states, counts)) / sum(counts)
    assert torch.equal(b["features.0.weight"], expected.float())


def test_result_entries_share_one_storage_and_load_into_the_model():
    s = model_state(0)
    acc = FedAvg(s)
    acc.add(s, 3)
    out = acc.result()
    floats = [v for v in out.values() if v.dtype == torch.float32]
    assert len({v.untyped_storage().data_ptr() for v in floats}) == 1  # torch.save writes one record
    ImprovedCNN().load_state_dict(out)


def test_reset_starts_a_new_average_in_the_same_memory():
    s0, s1 = model_state(0), model_state(1)
    acc = FedAvg(s0)
    floats = acc._floats
    acc.add(s0, 5)
    acc.reset()
    assert acc.count == 0 and acc.total_weight == 0
    acc.add(s1, 2)
    assert acc._floats is floats
    out = acc.result()
    for k in s1:
        assert torch.equal(out[k], s1[k]), k


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_validate_flat_rejects_non_finite(value):
    floats = torch.zeros(1000)
    validate_flat(floats)
    floats[517] = value
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        validate_flat(floats)


def test_result_without_updates_raises():
    with pytest.raises(ValueError):
        FedAvg(make_state(0)).result()
    with pytest.raises(ValueError):
        fedavg([])


@pytest.mark.parametrize("n", [0, -3])
def test_add_rejects_non_positive_weight(n):
    acc = FedAvg(make_state(0))
    with pytest.raises(InvalidUpdate):
        acc.add(make_state(1), n)
    assert acc.count == 0 and acc.total_weight == 0


# --- validate_state ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref():
    return model_state(0)


def test_validate_state_accepts_valid(ref):
    validate_state(model_state(1), ref)
    validate_state(ref, ref)


def test_validate_state_missing_key(ref):
    bad = dict(ref)
    del bad["features.1.running_var"]
    with pytest.raises(InvalidUpdate, match="missing"):
        validate_state(bad, ref)


def test_validate_state_extra_key(ref):
    bad = dict(ref)
    bad["evil"] = torch.zeros(1)
    with pytest.raises(InvalidUpdate, match="extra"):
        validate_state(bad, ref)


def test_validate_state_extra_non_string_key(ref):
    bad = dict(ref)
    bad[42] = torch.zeros(1)
    with pytest.raises(InvalidUpdate):
        validate_state(bad, ref)


def test_validate_state_wrong_shape(ref):
    bad = dict(ref)
    bad["classifier.4.bias"] = torch.zeros(11)
    with pytest.raises(InvalidUpdate, match="classifier.4.bias"):
        validate_state(bad, ref)
    bad["classifier.4.bias"] = torch.zeros(10, 1)
    with pytest.raises(InvalidUpdate):
        validate_state(bad, ref)


@pytest.mark.parametrize("key,dtype", [
    ("classifier.4.bias", torch.float64),
    ("classifier.4.bias", torch.float16),
    ("classifier.4.bias", torch.int32),
    ("features.1.num_batches_tracked", torch.float32),
    ("features.1.num_batches_tracked", torch.int32),
])
def test_validate_state_wrong_dtype(ref, key, dtype):
    bad = dict(ref)
    bad[key] = ref[key].to(dtype)
    with pytest.raises(InvalidUpdate, match="expected"):
        validate_state(bad, ref)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_validate_state_non_finite(ref, value):
    bad = dict(ref)
    t = ref["features.0.weight"].clone()
    t.view(-1)[7] = value
    bad["features.0.weight"] = t
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        validate_state(bad, ref)


@pytest.mark.parametrize("value", [[0.0] * 10, 1.0, None, "tensor", (0,) * 10])
def test_validate_state_non_tensor_value(ref, value):
    bad = dict(ref)
    bad["classifier.4.bias"] = value
    with pytest.raises(InvalidUpdate, match="not a tensor"):
        validate_state(bad, ref)


@pytest.mark.parametrize("value", [None, [1, 2], "state", torch.zeros(3)])
def test_validate_state_non_mapping(ref, value):
    with pytest.raises(InvalidUpdate):
        validate_state(value, ref)


# --- validate_num_samples ---------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 600, 60_000])
def test_validate_num_samples_accepts(n):
    assert validate_num_samples(n, 60_000) == n


@pytest.mark.parametrize("n", [0, -1, -600, True, False, 1.0, 600.0, "600", None, 60_001, 10**12])
def test_validate_num_samples_rejects(n):
    with pytest.raises(InvalidUpdate):
        validate_num_samples(n, 60_000)


def test_l2_norm_in_float64_across_slices():
    assert l2_norm(torch.tensor([3.0, 4.0])) == 5.0
    assert l2_norm(torch.zeros(0)) == 0.0
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(0))  # more than two slices
    assert l2_norm(x) == pytest.approx(torch.linalg.vector_norm(x.double()).item(), rel=1e-12)
    # float32 squares would overflow: 1e30^2 > 3.4e38
    big = torch.full((4,), 1e30)
    assert l2_norm(big) == pytest.approx(2e30, rel=1e-6)
    assert l2_norm(torch.tensor([[3.0, 0.0], [0.0, 4.0]])) == 5.0  # any shape


def test_clip_by_norm_leaves_small_updates_alone():
    delta = torch.tensor([3.0, 4.0])
    for max_norm in (5.0, 10.0):  # at and above the norm: the same tensor, no copy
        clipped, norm = clip_by_norm(delta, max_norm)
        assert clipped is delta and norm == 5.0


def test_clip_by_norm_scales_large_updates_down():
    delta = torch.tensor([3.0, 4.0])
    clipped, norm = clip_by_norm(delta, 1.0)
    assert norm == 5.0 and torch.allclose(clipped, torch.tensor([0.6, 0.8]))
    assert torch.equal(delta, torch.tensor([3.0, 4.0]))  # the input is not modified
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1)) * 10
    clipped, norm = clip_by_norm(x, 3.0)
    assert clipped.dtype == x.dtype and norm == pytest.approx(l2_norm(x))
    assert l2_norm(clipped) == pytest.approx(3.0, rel=1e-6) and l2_norm(clipped) <= 3.0 * (1 + 1e-6)
    assert torch.allclose(clipped / l2_norm(clipped), x / norm, atol=1e-6)  # same direction


def test_clip_by_norm_refuses_non_finite_updates_and_bad_limits():
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(InvalidUpdate, match="NaN or Inf"):
            clip_by_norm(torch.tensor([1.0, bad]), 10.0)
    for max_norm in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            clip_by_norm(torch.tensor([1.0]), max_norm)
