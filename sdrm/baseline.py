"""A small plain CNN: the baseline a user would otherwise train for the same budget."""

from __future__ import annotations

import torch
from torch import nn


class PlainCNN(nn.Module):
    """Four conv-BN-ReLU stages with max pooling, global average pooling and a linear head."""

    def __init__(self, image_size: int = 128, channels: tuple[int, ...] = (16, 32, 64, 96), classes: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(previous, classes)
        self.image_size = image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(-2, -1)))
