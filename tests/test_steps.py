"""fl/client/steps: the chain that turns a trained model into the UPDATE body. A step is
one class with ``apply``; the rules between steps (DP clipping turns 8-bit off, the flat
form for floats, stochastic rounding from the round's generator) hold whatever the chain."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_worker import model_msg, serve_one, small_data
from updates import update_message

from fl.client import participant
from fl.client.config import ClientConfig
from fl.client.host import Host
from fl.client.steps import Clip, Pack, Quantize, Update, plain_steps, run_steps
from fl.common.layout import Layout
from fl.learning.model import ImprovedCNN
from fl.learning.quantization import dequantize_state


def update(scale: float = 0.1, seed: int = 0) -> Update:
    torch.manual_seed(seed)
    base = ImprovedCNN().state_dict()
    local = {k: v + scale * torch.randn_like(v) if v.is_floating_point() else v + 3 for k, v in base.items()}
    return Update(4, local, base, 32, {"loss": 1.0}, torch.Generator().manual_seed(7))


def float_delta_norm(body: dict, base: dict) -> float:
    layout = Layout.of(base)
    return float((body["flat"]["float"] - layout.flatten(base)[0]).double().norm())


def test_the_plain_chains_and_their_body_keys():
    assert [type(s) for s in plain_steps(False, False, None)] == [Pack]
    assert [type(s) for s in plain_steps(True, True, None)] == [Quantize, Pack]
    assert [type(s) for s in plain_steps(True, False, 2.0)] == [Clip, Quantize, Pack]
    u = update()
    flat = run_steps(plain_steps(False, False, None), u)
    assert list(flat) == ["round", "num_samples", "metrics", "quantized", "flat"] and flat["quantized"] is False
    assert torch.equal(flat["flat"]["float"], Layout.of(u.local).flatten(u.local)[0])
    eight = run_steps(plain_steps(True, False, None), u)
    assert list(eight) == ["round", "num_samples", "metrics", "quantized", "delta"] and eight["quantized"] is True


def test_clipping_bounds_the_delta_and_turns_quantization_off():
    u = update(scale=0.1)
    assert float_delta_norm(run_steps([Pack()], u), u.base) > 1.0
    body = run_steps(plain_steps(True, True, 1.0), u)
    assert body["quantized"] is False and "flat" in body  # 8-bit rounding could break the bound
    assert float_delta_norm(body, u.base) == pytest.approx(1.0, rel=1e-4)
    assert body["flat"]["int"] == Layout.of(u.local).flatten(u.local)[1].tolist()  # counters as trained


def test_stochastic_rounding_draws_from_the_rounds_generator():
    u = update()
    bodies = [run_steps([Quantize(stochastic=True)], dataclasses.replace(u, generator=torch.Generator().manual_seed(s)))
              for s in (7, 7, 8)]
    first, again, other = (dequantize_state(b["delta"], like=u.base) for b in bodies)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())
    legacy = update_message(u.local, u.base, 4, 32, {"loss": 1.0}, quantization=True, stochastic=True,
                            generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(dequantize_state(legacy["delta"], like=u.base).values(),
                                                 first.values()))


def test_a_chain_without_a_body_is_refused():
    with pytest.raises(RuntimeError, match="no step"):
        run_steps([Clip(1.0)], update())


@dataclasses.dataclass(frozen=True)
class Halve:
    """A custom step: the float delta halved, before the body is made."""

    def apply(self, u: Update) -> Update:
        local = {k: u.base[k] + (v - u.base[k]) / 2 if v.is_floating_point() else v for k, v in u.local.items()}
        return dataclasses.replace(u, local=local)


def test_a_custom_step_inserted_by_a_participant_changes_the_update(monkeypatch):
    images, labels = small_data(32)
    state = ImprovedCNN().state_dict()

    def sent(custom: bool) -> dict:
        p = participant.Participant(0, Host(images, labels, torch.device("cpu")), ClientConfig(progress=False))
        if custom:
            honest = p.update_steps
            monkeypatch.setattr(p, "update_steps", lambda training: [Halve(), *honest(training)])
        return serve_one(p, [model_msg(1, state, 1)])[0][0]

    plain, halved = sent(False), sent(True)
    base = Layout.of(state).flatten(state)[0]
    assert torch.allclose(halved["flat"]["float"] - base, (plain["flat"]["float"] - base) / 2, atol=1e-6)
    assert list(halved) == list(plain)


def test_the_steps_package_holds_one_step_per_file():
    assert {type(s).__module__ for s in (Clip(1.0), Quantize(), Pack())} == {
        "fl.client.steps.clip", "fl.client.steps.quantize", "fl.client.steps.pack"}
