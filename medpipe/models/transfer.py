"""Transfer-learning classifiers: a backbone body's last feature map, then a linear or attention head.

A body is a module that maps (B, 3, H, W) images to a (B, C, h, w) feature map and has ``groups()``
(its block groups from the stem to the deepest block, for progressive unfreezing) and
``gradcam_layer`` (the module that outputs the last feature map). The bodies live with their
backbones: :mod:`medpipe.models.resnet` and :mod:`medpipe.models.efficientnet`.
"""

from __future__ import annotations

import torch
from torch import nn

from medpipe.models.attention import AttentionHead
from medpipe.models.errors import ArchitectureError

HEADS = ("linear", "attention")


def reset_head(linear: nn.Linear, std: float = 0.01) -> None:
    """normal(0, ``std``) weights and zero bias: a new head that starts near the uniform prediction."""
    nn.init.normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)


class LinearHead(nn.Module):
    """Global average pooling, dropout, one linear layer."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        reset_head(self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x.mean(dim=(2, 3))))


def make_head(head: str, channels: int, num_classes: int, dropout: float) -> nn.Module:
    """The ``head`` (one of ``HEADS``) on a ``channels``-deep feature map."""
    if head == "linear":
        return LinearHead(channels, num_classes, dropout)
    if head == "attention":
        return AttentionHead(channels, num_classes, dropout=dropout)
    raise ArchitectureError(f"unknown head {head!r}; choose one of {list(HEADS)}")


class FeatureClassifier(nn.Module):
    """``head(body(x))`` where ``body`` returns a (B, C, H, W) feature map."""

    def __init__(self, body: nn.Module, channels: int, num_classes: int, head: str = "linear",
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.body = body
        self.head = make_head(head, channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def groups(self) -> list[nn.Module]:
        return self.body.groups()

    @property
    def gradcam_layer(self) -> nn.Module:
        """The module whose output is the last feature map (a module that is called in ``forward``)."""
        return self.body.gradcam_layer
