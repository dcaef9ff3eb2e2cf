import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_synthetic_images
from model import ImprovedCNN
from training import evaluate, round_lr, train


@pytest.fixture(scope="module")
def data():
    labels = torch.arange(320) % 10
    return make_synthetic_images(labels, seed=1), labels


def test_evaluate_matches_a_direct_forward_pass_whatever_the_batch(data):
    images, labels = data
    torch.manual_seed(0)
    model = ImprovedCNN()
    with torch.no_grad():
        out = model.eval()(images.float().div(255).sub(0.1307).div(0.3081).unsqueeze(1))
    expected_loss = F.cross_entropy(out, labels).item()
    expected_acc = (out.argmax(1) == labels).float().mean().item()
    for batch_size in (None, 7, 1000):  # None: the default for the device
        loss, acc = evaluate(model, images, labels, batch_size=batch_size)
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        assert acc == pytest.approx(expected_acc)
    assert model.training is False


def test_train_learns_the_synthetic_task_and_reports_its_work(data):
    images, labels = data
    torch.manual_seed(0)
    model = ImprovedCNN()
    before, _ = evaluate(model, images, labels)
    result = train(model, images, labels, epochs=2, lr=1e-3, batch_size=32,
                   generator=torch.Generator().manual_seed(0), progress=False)
    after, accuracy = evaluate(model, images, labels)
    assert result.samples == 2 * len(labels) and result.seconds > 0
    assert math.isfinite(result.loss) and 0 <= result.accuracy <= 1
    assert after < before / 2 and accuracy > 0.8


def test_train_is_reproducible_with_the_same_generator(data):
    images, labels = data
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = ImprovedCNN()
        train(model, images[:64], labels[:64], epochs=1, lr=1e-3, batch_size=16,
              generator=torch.Generator().manual_seed(3), progress=False)
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_round_lr_cosine_from_base_to_floor():
    assert round_lr(1e-3, 1, 5) == pytest.approx(1e-3)
    assert round_lr(1e-3, 5, 5) == pytest.approx(1e-4)
    assert round_lr(1e-3, 3, 5) == pytest.approx(0.55e-3)
    lrs = [round_lr(1e-3, r, 5) for r in range(1, 6)]
    assert lrs == sorted(lrs, reverse=True)
    assert round_lr(1e-3, 4, 5, "constant") == 1e-3
    assert round_lr(1e-3, 1, 1) == 1e-3
