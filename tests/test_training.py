import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_synthetic_images
from torch import nn

from fl.learning import training
from fl.learning.config import TrainingConfig
from fl.learning.data import to_float
from fl.learning.model import ImprovedCNN
from fl.learning.training import add_proximal_gradient, client_optimizer, evaluate, proximal_term, round_lr, train


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
    result = train(model, images, labels, TrainingConfig(epochs=2, lr=1e-3, batch_size=32),
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
        train(model, images[:64], labels[:64], TrainingConfig(epochs=1, lr=1e-3, batch_size=16),
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


def test_proximal_term_and_its_gradient():
    # w = [1, 2] (weight) and [-1] (bias), w_global = [0.5, -1] and [1]:
    # ||w - w_g||^2 = 0.25 + 9 + 4 = 13.25; gradient of mu/2 * that = mu * (w - w_g)
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)]
    anchors = [torch.tensor([0.5, -1.0]), torch.tensor([1.0])]
    term = proximal_term(w, anchors)
    assert term.item() == 13.25
    (0.1 / 2 * term).backward()
    assert torch.allclose(w[0].grad, torch.tensor([0.05, 0.3])) and torch.allclose(w[1].grad, torch.tensor([-0.2]))


def test_proximal_gradient_on_a_tiny_model_equals_mu_times_the_drift():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    anchors = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    mu = 0.7
    (mu / 2 * proximal_term(params, anchors)).backward()
    for p, a in zip(params, anchors):
        assert torch.allclose(p.grad, mu * (p.detach() - a))


def test_proximal_gradient_added_after_backward_equals_the_term_in_the_loss():
    torch.manual_seed(1)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    models = [nn.Linear(5, 3), nn.Linear(5, 3)]
    models[1].load_state_dict(models[0].state_dict())
    anchors = [p.detach().clone() for p in models[0].parameters()]
    with torch.no_grad():
        for m in models:
            for p, d in zip(m.parameters(), (torch.full((3, 5), 0.3), torch.full((3,), -0.2))):
                p.add_(d)
    mu = 0.5
    params = list(models[0].parameters())
    (F.cross_entropy(models[0](x), y) + mu / 2 * proximal_term(params, anchors)).backward()
    F.cross_entropy(models[1](x), y).backward()
    add_proximal_gradient(list(models[1].parameters()), anchors, mu)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def fit(data, **kwargs) -> nn.Module:
    images, labels = data
    model = tiny_model()
    train(model, images[:96], labels[:96], TrainingConfig(epochs=2, lr=1e-2, batch_size=16, augment=False, **kwargs),
          generator=torch.Generator().manual_seed(5), progress=False)
    return model


def test_fedprox_mu_zero_is_the_plain_loop(data, monkeypatch):
    plain = fit(data)
    monkeypatch.setattr(training, "add_proximal_gradient", lambda *a: pytest.fail("proximal gradient at mu=0"))
    zero = fit(data, mu=0.0)
    for a, b in zip(plain.parameters(), zero.parameters()):
        assert torch.equal(a, b)


def test_fedprox_keeps_the_model_near_the_one_it_received(data):
    start = [p.detach().clone() for p in tiny_model().parameters()]

    def drift(model):
        return math.sqrt(sum((p.detach() - s).pow(2).sum().item() for p, s in zip(model.parameters(), start)))

    free, pulled = drift(fit(data)), drift(fit(data, mu=10.0))
    assert pulled < free / 2
    assert drift(fit(data, mu=1e-9)) == pytest.approx(free, rel=1e-3)


def test_fedprox_refuses_a_bad_mu(data):
    for mu in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mu"):
            fit(data, mu=mu)


def linear_gradient(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Cross-entropy's gradient for a linear softmax model, in closed form:
    dW = (softmax(xW^T + b) - onehot(y))^T x / n, db = mean(softmax - onehot)."""
    err = torch.softmax(x @ w.T + b, dim=1) - F.one_hot(y, 10).double()
    return err.T @ x / len(y), err.mean(0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_takes_the_heavy_ball_steps_computed_by_hand(data, momentum):
    """Two full-batch steps: v1 = g(w0), w1 = w0 - lr v1; v2 = m v1 + g(w1), w2 = w1 - lr v2."""
    images, labels = data
    images, labels = images[:40], labels[:40]
    model, lr = tiny_model(), 0.5
    w, b = (p.detach().double().clone() for p in model[1].parameters())
    x = to_float(images).flatten(1).double()
    velocity = None
    for _ in range(2):
        gw, gb = linear_gradient(w, b, x, labels)
        velocity = (gw, gb) if velocity is None else (momentum * velocity[0] + gw, momentum * velocity[1] + gb)
        w, b = w - lr * velocity[0], b - lr * velocity[1]
    train(model, images, labels, TrainingConfig(epochs=2, lr=lr, batch_size=40, augment=False, optimizer="sgd",
                                                momentum=momentum),
          generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.allclose(model[1].weight.double(), w, atol=1e-5)
    assert torch.allclose(model[1].bias.double(), b, atol=1e-5)


def test_adam_moves_a_weakly_pulled_weight_by_lr_where_sgd_moves_it_by_lr_times_its_gradient():
    """Why SGD on label-skewed shards: Adam's first step is lr * g / |g| per coordinate, so
    an output weight with a vanishing gradient (a class absent from the shard) still moves
    by lr; SGD moves it by lr * g."""
    grad = torch.tensor([1.0, 1e-4])
    steps = {}
    for name in ("adam", "sgd"):
        w = torch.zeros(2, requires_grad=True)
        opt = client_optimizer([w], name, lr=0.01)
        w.grad = grad.clone()
        opt.step()
        steps[name] = -w.detach()
    assert torch.allclose(steps["adam"], torch.tensor([0.01, 0.01]), rtol=1e-3)  # eps = 1e-8 << 1e-4
    assert torch.allclose(steps["sgd"], 0.01 * grad)


@pytest.mark.parametrize("name, lr, momentum, message", [
    ("rmsprop", 0.1, 0.0, "unknown client optimizer 'rmsprop'"),
    ("sgd", 0.0, 0.0, "lr must be"),
    ("sgd", float("nan"), 0.0, "lr must be"),
    ("sgd", 0.1, 1.0, "momentum must be"),
    ("sgd", 0.1, -0.5, "momentum must be"),
])
def test_client_optimizer_refuses_bad_settings(name, lr, momentum, message):
    with pytest.raises(ValueError, match=message):
        client_optimizer([torch.zeros(1, requires_grad=True)], name, lr, momentum)


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    with torch.no_grad():  # global statistics unlike any batch's
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    return model


def test_freeze_bn_normalises_with_the_global_statistics_and_keeps_them(data):
    """FixBN's calibration phase: one full-batch SGD step equals the step of the same model
    with BatchNorm in eval mode (normalised by running_mean 0.3, running_var 2), and the
    statistics and their counter come back unchanged; without it they move."""
    images, labels = data
    images, labels = images[:32], labels[:32]
    frozen, reference, plain = bn_model(), bn_model(), bn_model()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    common = TrainingConfig(epochs=1, lr=0.1, batch_size=32, augment=False, optimizer="sgd")
    train(frozen, images, labels, dataclasses.replace(common, freeze_bn=True),
          generator=torch.Generator().manual_seed(0), progress=False)
    reference[1].eval()
    F.cross_entropy(reference(to_float(images)), labels).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for a, b in zip(frozen.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(frozen.state_dict()[k], before[k]), k
    train(plain, images, labels, common, generator=torch.Generator().manual_seed(0), progress=False)
    assert not torch.allclose(plain[1].running_mean, before["1.running_mean"])
    assert not torch.allclose(plain[0].weight, frozen[0].weight)


GOOD_CONFIG = {"epochs": 5, "batch_size": 10, "lr": 0.05, "optimizer": "sgd", "momentum": 0.0, "mu": 0.01}


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"epochs": True}, "epochs must be an integer >= 1"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr": -0.1}, "lr must be > 0"),
    ({"lr": "0.1"}, "lr must be a finite number"),
    ({"momentum": 1.0}, "momentum must be in"),
    ({"mu": -1}, "mu must be >= 0"),
    ({"optimizer": "rmsprop"}, "unknown client optimizer 'rmsprop'"),
])
def test_a_client_refuses_an_unusable_training_config_in_one_line(change, message):
    TrainingConfig.from_wire(GOOD_CONFIG)
    TrainingConfig.from_wire({"epochs": 1, "batch_size": 64, "lr": 1e-3})  # an older server's keys
    with pytest.raises(ValueError, match=message):
        TrainingConfig.from_wire({**GOOD_CONFIG, **change})


def test_the_wire_form_has_the_keys_servers_always_sent_in_their_order():
    plain = TrainingConfig(epochs=2, lr=0.01, batch_size=10, optimizer="sgd", momentum=0.9)
    assert list(plain.to_wire()) == ["epochs", "batch_size", "augment", "hflip", "optimizer", "momentum",
                                     "freeze_bn", "lr"]
    both = dataclasses.replace(plain, mu=0.01, dp_clip_norm=1.0)
    assert list(both.to_wire())[-2:] == ["mu", "dp_clip_norm"]
    for config in (plain, both):
        assert TrainingConfig.from_wire(config.to_wire()) == config
    older = TrainingConfig.from_wire({"epochs": 1, "batch_size": 64, "lr": 1e-3})
    assert (older.optimizer, older.momentum, older.augment, older.mu, older.proximal_mu) == ("adam", 0.0, True, None, 0)


@pytest.mark.parametrize("dp", [0, -1.0, float("nan"), True, "1"])
def test_a_bad_dp_clip_norm_is_refused(dp):
    with pytest.raises(ValueError, match="dp_clip_norm must be a positive number"):
        TrainingConfig.from_wire({**GOOD_CONFIG, "dp_clip_norm": dp})
