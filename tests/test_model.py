from __future__ import annotations

import pytest
import torch
from torch import nn

from fl.learning.model import ImprovedCNN, count_parameters

EXPECTED_KEYS = {
    "features.0.weight", "features.0.bias",
    "features.1.weight", "features.1.bias",
    "features.1.running_mean", "features.1.running_var", "features.1.num_batches_tracked",
    "features.4.weight", "features.4.bias",
    "features.5.weight", "features.5.bias",
    "features.5.running_mean", "features.5.running_var", "features.5.num_batches_tracked",
    "classifier.1.weight", "classifier.1.bias",
    "classifier.4.weight", "classifier.4.bias",
}


def test_parameter_count_is_exact():
    model = ImprovedCNN()
    assert count_parameters(model) == 421_834
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 421_834


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_output_shape(batch):
    model = ImprovedCNN().eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 1, 28, 28))
    assert out.shape == (batch, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_output_shape_in_train_mode_and_backward():
    model = ImprovedCNN().train()
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_num_classes_argument():
    model = ImprovedCNN(num_classes=3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_state_dict_key_set_and_buffers():
    sd = ImprovedCNN().state_dict()
    assert set(sd) == EXPECTED_KEYS
    for bn, ch in (("features.1", 32), ("features.5", 64)):
        assert sd[f"{bn}.running_mean"].shape == (ch,)
        assert sd[f"{bn}.running_var"].shape == (ch,)
        assert sd[f"{bn}.num_batches_tracked"].dtype == torch.int64
        assert sd[f"{bn}.num_batches_tracked"].shape == ()
        assert torch.equal(sd[f"{bn}.running_mean"], torch.zeros(ch))
        assert torch.equal(sd[f"{bn}.running_var"], torch.ones(ch))


def test_state_dict_shapes():
    sd = ImprovedCNN().state_dict()
    assert sd["features.0.weight"].shape == (32, 1, 3, 3)
    assert sd["features.4.weight"].shape == (64, 32, 3, 3)
    assert sd["classifier.1.weight"].shape == (128, 3136)
    assert sd["classifier.4.weight"].shape == (10, 128)
    assert sd["classifier.4.bias"].shape == (10,)


def test_batchnorm_buffers_update_in_training():
    model = ImprovedCNN().train()
    model(torch.randn(8, 1, 28, 28) + 2.0)
    sd = model.state_dict()
    assert int(sd["features.1.num_batches_tracked"]) == 1
    assert not torch.equal(sd["features.1.running_mean"], torch.zeros(32))


def test_layer_structure():
    model = ImprovedCNN()
    f, c = list(model.features), list(model.classifier)
    assert [type(m) for m in f] == [
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
    ]
    assert [type(m) for m in c] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]

    for conv, (cin, cout) in ((f[0], (1, 32)), (f[4], (32, 64))):
        assert (conv.in_channels, conv.out_channels) == (cin, cout)
        assert conv.kernel_size == (3, 3)
        assert conv.padding == (1, 1)
        assert conv.stride == (1, 1)
        assert conv.bias is not None
    assert f[1].num_features == 32 and f[5].num_features == 64
    assert f[1].track_running_stats and f[5].track_running_stats
    for pool in (f[3], f[7]):
        assert pool.kernel_size == 2
    assert (c[1].in_features, c[1].out_features) == (3136, 128)
    assert c[3].p == 0.5
    assert (c[4].in_features, c[4].out_features) == (128, 10)


def test_feature_map_is_64x7x7():
    model = ImprovedCNN().eval()
    with torch.no_grad():
        feats = model.features(torch.randn(2, 1, 28, 28))
    assert feats.shape == (2, 64, 7, 7)


def test_eval_mode_is_deterministic_train_mode_uses_dropout():
    torch.manual_seed(0)
    model = ImprovedCNN()
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.equal(a, b)


def test_state_dict_round_trip_reproduces_outputs():
    torch.manual_seed(0)
    src = ImprovedCNN()
    src.train()
    src(torch.randn(8, 1, 28, 28))  # move BN statistics off their defaults
    dst = ImprovedCNN()
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 1, 28, 28)
    src.eval(), dst.eval()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_conv_weights_are_channels_last_and_compute_the_same_as_nchw():
    torch.manual_seed(0)
    model = ImprovedCNN().eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    nchw = ImprovedCNN().to(memory_format=torch.contiguous_format).eval()
    nchw.load_state_dict(model.state_dict())
    assert not convs[1].weight.is_contiguous() and nchw.features[4].weight.is_contiguous()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), nchw(x), atol=1e-5)
