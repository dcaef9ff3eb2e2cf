"""ImprovedCNN, the default model: two conv blocks and an MLP head, for small images."""
from __future__ import annotations

import torch
from torch import nn


class ImprovedCNN(nn.Module):
    """Two conv blocks with BatchNorm, then a dropout-regularised MLP head.

    421,834 parameters on 1x28x28 digits. BatchNorm running statistics are buffers, so
    they travel in the ``state_dict`` together with the weights and are averaged like them.
    Other C x H x W inputs get the head their flattened features need (H and W at least 4).
    """

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28)) -> None:
        super().__init__()
        channels, height, width = input_shape
        if height < 4 or width < 4:
            raise ValueError(f"improved-cnn needs images of at least 4x4, got {height}x{width}")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )
        # Channels-last (NHWC) weights make the convolutions and max-pooling run channels-last:
        # on CPU a training step is faster, inference more so (NCHW max_pool2d is slow).
        # Only strides change: state_dict values, shapes and the wire format stay the same.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return ImprovedCNN(num_classes, tuple(input_shape))
