"""A two-layer perceptron: the smallest model, a baseline for any image size."""
from __future__ import annotations

import math

from torch import nn


def build(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 256), nn.ReLU(inplace=True),
                         nn.Linear(256, num_classes))
