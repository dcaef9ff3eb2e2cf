"""The built-in default model and the parameter count, where they have always been imported
from; the models themselves live in ``fl/learning/models/``."""
from __future__ import annotations

from torch import nn

from fl.learning.models.improved_cnn import ImprovedCNN

__all__ = ["ImprovedCNN", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
