"""participant.py's pure helpers: client-side DP clipping of the whole state."""
from __future__ import annotations

import pytest
import torch

from layout import Layout
from model import ImprovedCNN
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
