"""contribution.py: an UPDATE parsed into one record, each refusal with its reason; and the
aggregators' ``add_sum`` (a secure sum), against hand-computed values."""
from __future__ import annotations

import re

import pytest
import torch

from fl.common.layout import Layout
from fl.common.vectors import InvalidUpdate
from fl.learning.quantization import quantize_state, state_delta
from fl.privacy.fixed_clipping import DPMeanAggregator
from fl.server.contribution import (
    Update,
    checked_delta,
    client_record,
    parse,
    parse_metadata,
    reported,
)
from fl.strategies import make
from fl.strategies.base import MeanAggregator

BASE = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "bn.running_var": torch.tensor([0.5, 1.0]),
        "bn.num_batches_tracked": torch.tensor(7)}
LAYOUT = Layout.of(BASE)
BASE_FLOATS = LAYOUT.flatten(BASE)[0]
VARIANCES = [e for e in LAYOUT.entries if e.name.endswith("running_var")]


def local(**changes):
    state = {k: v.clone() for k, v in BASE.items()}
    state["w"] += 0.25
    state["bn.num_batches_tracked"] += 3
    state.update(changes)
    return state


def body(form="flat", state=None, **fields):
    state = local() if state is None else state
    out = {"round": 1, "num_samples": 10, "metrics": {"loss": 0.5}, "quantized": form == "quantized"}
    if form == "flat":
        out["flat"] = LAYOUT.pack(state)
    elif form == "state":
        out["state"] = state
    elif form == "quantized":
        out["delta"] = quantize_state(state_delta(state, BASE))
    out.update(fields)
    return out


def parsed(b):
    return parse(b, LAYOUT, BASE, round=1, max_samples=100)


@pytest.mark.parametrize("form", ["flat", "state", "quantized"])
def test_each_form_parses_to_the_same_delta(form):
    update = parsed(body(form))
    assert (update.round, update.num_samples, update.metrics, update.quantized) == (1, 10, {"loss": 0.5},
                                                                                    form == "quantized")
    delta, norm = checked_delta(update, BASE_FLOATS, VARIANCES)
    assert torch.allclose(delta, torch.tensor([0.25] * 4 + [0.0, 0.0]), atol=1e-6)
    assert norm == pytest.approx(0.5, abs=1e-5)
    assert update.ints.tolist() == [10]  # counters travel absolute
    if form == "quantized":
        assert delta is update.floats  # the dequantized delta is used as is, not copied


def test_a_plain_update_is_measured_from_the_base():
    update = Update(1, 1, {}, False, torch.tensor([2.0, 3.0]), torch.tensor([0]))
    assert update.delta(torch.tensor([1.0, 1.0])).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("change, reason", [
    ({"round": None}, "message lacks field 'round'"),
    ({"round": True}, "field 'round' has type bool"),
    ({"round": 2}, "update for round 2, expected 1"),
    ({"num_samples": 0}, "implausible sample count 0 (expected 1..100)"),
    ({"num_samples": 101}, "implausible sample count 101"),
    ({"num_samples": True}, "implausible sample count True"),
    ({"num_samples": "5"}, "implausible sample count '5'"),
    ({"metrics": [1]}, "field 'metrics' has type list"),
    ({"quantized": None}, "message lacks field 'quantized'"),
    ({"quantized": 1}, "field 'quantized' has type int"),
    ({"flat": {"layout": 1, "float": BASE_FLOATS, "int": [0]}}, "packed for a different model"),
    ({"flat": {**LAYOUT.pack(BASE), "int": [1.5]}}, "int entries must be a list of 1 64-bit ints"),
    ({"flat": {**LAYOUT.pack(BASE), "float": torch.zeros(5)}}, "float vector is torch.float32[5]"),
    ({"flat": {**LAYOUT.pack(BASE), "float": torch.tensor([1, 2, 3, 4, 5, float("nan")])}},
     "update holds NaN or Inf"),
])
def test_parse_refuses_a_bad_field(change, reason):
    b = body("flat")
    for k, v in change.items():
        if v is None:
            del b[k]
        else:
            b[k] = v
    with pytest.raises(InvalidUpdate, match="^" + re.escape(reason)):
        parsed(b)


@pytest.mark.parametrize("state, reason", [
    ([1, 2], "field 'state' has type list"),
    ({"w": BASE["w"]}, "keys differ from the model: missing"),
    ({**local(), "x": BASE["w"]}, r"keys differ from the model: missing \[\], extra \['x'\]"),
    (local(w=torch.zeros(2, 2, dtype=torch.float64)), r"w is torch.float64\[2, 2\], expected torch.float32\[2, 2\]"),
    (local(w=torch.zeros(4)), r"w is torch.float32\[4\]"),
    (local(w=[1.0]), "w is a list, not a tensor"),
    (local(w=torch.tensor([[1.0, float("inf")], [0.0, 0.0]])), "w holds NaN or Inf"),
])
def test_parse_refuses_a_bad_state(state, reason):
    with pytest.raises(InvalidUpdate, match=f"^{reason}"):
        parsed(body("state", state=state) if isinstance(state, dict) else {**body("none"), "state": state})


def test_parse_refuses_a_body_without_weights_and_bad_quantized_deltas():
    with pytest.raises(InvalidUpdate, match="^message lacks field 'state'"):
        parsed(body("none"))
    good = body("quantized")
    with pytest.raises(InvalidUpdate, match="^field 'delta' has type list"):
        parsed({**good, "delta": []})
    with pytest.raises(InvalidUpdate, match="^'x': not present in the reference state"):
        parsed({**good, "delta": {**good["delta"], "x": good["delta"]["w"]}})
    with pytest.raises(InvalidUpdate, match="^'w': shape"):
        parsed({**good, "delta": {**good["delta"], "w": torch.zeros(3)}})
    with pytest.raises(InvalidUpdate, match="^keys differ"):
        parsed({**good, "delta": {"w": good["delta"]["w"]}})


def test_checked_delta_refuses_negative_variances_and_an_infinite_norm():
    update = parsed(body("flat", state=local(**{"bn.running_var": torch.tensor([0.5, -0.25])})))
    with pytest.raises(InvalidUpdate, match="^bn.running_var holds negative variances"):
        checked_delta(update, BASE_FLOATS, VARIANCES)
    huge = Update(1, 1, {}, False, torch.tensor([3e38, 0, 0, 0, 1, 1]), torch.tensor([0]))
    base = torch.tensor([-3e38, 0, 0, 0, 1, 1])  # each finite, the difference is not
    with pytest.raises(InvalidUpdate, match="^update norm is not finite"):
        checked_delta(huge, base, VARIANCES)


def test_masked_input_metadata():
    meta = parse_metadata({"num_samples": 5, "metrics": {"loss": 1.0}, "ints": [3]}, 1, 10)
    assert (meta.num_samples, meta.ints.tolist(), meta.metrics) == (5, [3], {"loss": 1.0})
    for bad, reason in [({"num_samples": 11}, "implausible sample count 11"),
                        ({"metrics": []}, "metrics must be a dict"),
                        ({"ints": [1, 2]}, "ints must be a list of 1 64-bit ints"),
                        ({"ints": [1 << 63]}, "ints must be a list"),
                        ({"ints": [True]}, "ints must be a list")]:
        with pytest.raises(InvalidUpdate, match="^" + re.escape(reason)):
            parse_metadata({"num_samples": 5, "metrics": {}, "ints": [3], **bad}, 1, 10)


def test_client_record_keeps_only_sane_figures():
    record = client_record(4, 10, True, 123, 0.5, {"train_s": 2, "loss": float("nan"), "accuracy": True})
    assert record == {"client_id": 4, "samples": 10, "quantized": True, "bytes_up": 123, "norm": 0.5,
                      "train_s": 2.0, "loss": None, "accuracy": None}
    assert [reported(v) for v in (-1.0, float("inf"), "1", 0, 1.5)] == [None, None, None, 0.0, 1.5]


# --- add_sum -------------------------------------------------------------------------------------

def test_mean_add_sum_counts_each_summed_delta_with_weight_one():
    agg = MeanAggregator(3)
    agg.add(torch.tensor([1.0, 2.0, 3.0]), 2.0)  # sum [2, 4, 6], weight 2
    agg.add_sum(torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64), 3)  # sum [12, 24, 36], weight 5
    assert (agg.count, agg.total_weight) == (4, 5.0)
    assert agg.result().tolist() == pytest.approx([2.4, 4.8, 7.2])


@pytest.mark.parametrize("total, count, reason", [
    (torch.zeros(3), 1, r"a secure sum is float64\[3\], got torch.float32\[3\]"),
    (torch.zeros(4, dtype=torch.float64), 1, r"a secure sum is float64\[3\], got torch.float64\[4\]"),
    (torch.zeros(3, dtype=torch.float64), 0, "a sum counts at least one update"),
    (torch.zeros(3, dtype=torch.float64), True, "a sum counts at least one update"),
])
def test_add_sum_refuses_a_wrong_sum(total, count, reason):
    agg = MeanAggregator(3)
    with pytest.raises(ValueError, match=f"^{reason}"):
        agg.add_sum(total, count)
    assert agg.count == 0 and agg.sum.tolist() == [0.0, 0.0, 0.0]


def test_dp_add_sum_divides_by_the_sampled_and_never_after_release():
    agg = DPMeanAggregator(3, clip_norm=1.0, sampled=4, noise_std=0.0, generator=torch.Generator(),
                           clip_at_server=False, norm_limit=1.0)
    agg.add(torch.tensor([0.5, 0.0, 0.0]), 7.0)  # weight ignored
    agg.add_sum(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64), 2)
    assert (agg.count, agg.unclipped) == (3, 1)
    with pytest.raises(ValueError, match="more updates than the 4 clients"):
        agg.add_sum(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), 2)
    assert agg.result().tolist() == pytest.approx([0.375, 0.5, -0.25])  # / m = 4, not / 3
    with pytest.raises(RuntimeError, match="already released"):
        agg.add_sum(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), 1)


def test_a_rule_that_needs_each_delta_refuses_a_sum():
    with pytest.raises(TypeError, match="HeldDeltas cannot take a secure sum"):
        make("trimmed-mean").aggregator(3).add_sum(torch.zeros(3, dtype=torch.float64), 2)
