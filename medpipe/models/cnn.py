"""Small CNNs of the published studies, built for any input size and class count.

- ``TwoConvCNN``: Conv 32 -> BN -> MaxPool -> Conv 64 -> BN -> MaxPool -> Dense 128 -> Dropout 0.5 -> Dense
  (3x3 'same' convolutions with ReLU as in the Keras original; 421,894 trainable parameters on 28x28x3
  with 6 classes).
- ``FourConvCNN``: four Conv-BN-ReLU-MaxPool blocks (32, 64, 128, 256 filters), dropout, Dense 256 ->
  Dropout -> Dense.
- ``BrainMRICNN``: zero padding 2, 32 filters 7x7 stride 1, BN, ReLU, two 4x4 max pools with stride 4,
  flatten, dense output (the brain-MRI tumour detection model, softmax over the classes instead of one
  sigmoid unit).

Each model exposes ``features`` (the convolutional part) and ``gradcam_layer`` (its last convolution
block) for Grad-CAM.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn


def _flat_size(features: nn.Module, input_size: int) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, 3, input_size, input_size)).numel())


class TwoConvCNN(nn.Module):
    def __init__(self, num_classes: int, input_size: int = 28, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(32), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(64), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(_flat_size(self.features, input_size), 128), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(128, num_classes),
        )

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.features[6]  # BatchNorm after the last convolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class FourConvCNN(nn.Module):
    def __init__(self, num_classes: int, input_size: int = 128, dropout: float = 0.5,
                 widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        chans = (3, *widths)
        self.features = nn.Sequential(*(_conv_block(a, b) for a, b in pairwise(chans)))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout / 2), nn.Flatten(), nn.Linear(_flat_size(self.features, input_size), 256),
            nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(256, num_classes),
        )

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.features[-1][2]  # ReLU of the last block, before its pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BrainMRICNN(nn.Module):
    def __init__(self, num_classes: int, input_size: int = 240, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ZeroPad2d(2), nn.Conv2d(3, 32, 7, stride=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.MaxPool2d(4, stride=4), nn.MaxPool2d(4, stride=4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(_flat_size(self.features, input_size), num_classes),
        )

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.features[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


CNNS = {"cnn_two_conv": TwoConvCNN, "cnn_four_conv": FourConvCNN, "cnn_brain_mri": BrainMRICNN}
