"""participant.py's pure helpers: client-side DP clipping of the whole state, and the
training config a client obeys."""
from __future__ import annotations

import pytest
import torch

from layout import Layout
from model import ImprovedCNN
import participant
from participant import clip_delta


def test_clip_delta_bounds_the_float_delta_and_keeps_the_counters():
    base = ImprovedCNN().state_dict()
    local = {k: v + 0.1 if v.is_floating_point() else v + 5 for k, v in base.items()}
    clipped = clip_delta(local, base, 1.0)
    layout = Layout.of(base)
    delta = layout.flatten(clipped)[0] - layout.flatten(base)[0]
    assert float(delta.double().norm()) == pytest.approx(1.0, rel=1e-4)
    before = layout.flatten(local)[0] - layout.flatten(base)[0]
    assert torch.allclose(delta, before * (1.0 / float(before.double().norm())), atol=1e-6)
    for k, v in local.items():
        if not v.is_floating_point():
            assert torch.equal(clipped[k], v)
    small = {k: v + 1e-6 if v.is_floating_point() else v for k, v in base.items()}
    unchanged = clip_delta(small, base, 1.0)
    assert all(torch.allclose(unchanged[k], small[k]) for k in small)


@pytest.mark.parametrize("sent, expected", [
    ({}, ("adam", 0.0, 0.0)),  # a server that names no optimizer: Adam, as before the key existed
    ({"optimizer": "sgd", "momentum": 0.9, "mu": 0.01}, ("sgd", 0.9, 0.01)),
])
def test_fit_trains_with_the_optimizer_the_server_named(monkeypatch, sent, expected):
    seen = {}

    def fake_train(model, images, labels, **kwargs):
        seen.update(kwargs)
        return "result"

    monkeypatch.setattr(participant, "train", fake_train)
    model = torch.nn.Linear(2, 2)
    config = {"epochs": 1, "lr": 0.05, "batch_size": 4, **sent}
    participant.fit(model, torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), None,
                    client_id=3, seed=0, round_num=1, config=config, base=model.state_dict())
    assert (seen["optimizer"], seen["momentum"], seen["mu"]) == expected
    assert seen["lr"] == 0.05
