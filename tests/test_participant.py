"""The client's pure helpers: client-side DP clipping of the whole state (steps/clip.py),
local training (local.py) and the training config a client obeys."""
from __future__ import annotations

import pytest
import torch

from fl.client import local, participant
from fl.client.steps.clip import clip_delta
from fl.common.layout import Layout
from fl.learning.config import TrainingConfig
from fl.learning.model import ImprovedCNN


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
    ({}, ("adam", 0.0, 0.0, False)),  # a server that names none of these: as before the keys existed
    ({"optimizer": "sgd", "momentum": 0.9, "mu": 0.01, "freeze_bn": True}, ("sgd", 0.9, 0.01, True)),
])
def test_fit_trains_with_the_optimizer_the_server_named(monkeypatch, sent, expected):
    seen = {}

    def fake_train(model, images, labels, config, **kwargs):
        seen["config"] = config
        return "result"

    monkeypatch.setattr(local, "train", fake_train)
    model = torch.nn.Linear(2, 2)
    config = TrainingConfig.from_wire({"epochs": 1, "lr": 0.05, "batch_size": 4, **sent})
    local.fit(model, torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), None,
              client_id=3, seed=0, round_num=1, config=config, base=model.state_dict())
    seen = seen["config"]
    assert (seen.optimizer, seen.momentum, seen.proximal_mu, seen.freeze_bn) == expected
    assert seen.lr == 0.05


def test_fit_returns_a_copy_that_the_next_client_on_the_same_model_leaves_alone():
    """Hosts train client after client on one model: a returned state aliasing the model's
    tensors (what ``.cpu()`` gives on the CPU) would turn into the last client's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    config = TrainingConfig(epochs=1, lr=0.1, batch_size=4, optimizer="sgd", augment=False)
    first = local.fit(model, images, torch.zeros(8, dtype=torch.long), None, 0, 0, 1, config, base)[0]
    kept = {k: v.clone() for k, v in first.items()}
    local.fit(model, images, torch.ones(8, dtype=torch.long), None, 1, 0, 1, config, base)
    for k in kept:
        assert torch.equal(first[k], kept[k]), k


def test_a_model_message_with_an_unusable_training_config_is_a_protocol_error():
    from fl.wire.errors import ProtocolError
    good = {"epochs": 1, "batch_size": 8, "lr": 0.1}
    assert participant.Participant.training_config({"config": good}) == TrainingConfig(epochs=1, batch_size=8, lr=0.1)
    with pytest.raises(ProtocolError, match="unusable training config: unknown client optimizer 'evil'"):
        participant.Participant.training_config({"config": {**good, "optimizer": "evil"}})
    with pytest.raises(ProtocolError, match="lacks field 'config'"):
        participant.Participant.training_config({})
