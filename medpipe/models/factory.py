"""Build any classifier of the pipeline from a plain, serialisable spec (as stored in checkpoints)."""

from __future__ import annotations

from typing import Any

from torch import nn

from medpipe.models.cnn import CNNS
from medpipe.models.resnet import build_transfer

TRANSFER_ARCHS = ("resnet18", "resnet34", "resnet50", "efficientnet_lite0")


def build_classifier(spec: dict[str, Any], pretrained: bool = True) -> nn.Module:
    """``spec``: arch, num_classes, input_size, dropout, and for transfer models weights and head.

    ``pretrained=False`` skips loading pretrained weights (used when a checkpoint supplies them).
    """
    arch = spec["arch"]
    if arch in CNNS:
        return CNNS[arch](spec["num_classes"], input_size=spec["input_size"], dropout=spec.get("dropout", 0.5))
    if arch in TRANSFER_ARCHS:
        weights = spec.get("weights", "none") if pretrained else "none"
        return build_transfer(arch, spec["num_classes"], weights, spec.get("head", "linear"), spec.get("dropout", 0.2))
    raise ValueError(f"unknown architecture {arch!r}; known: {sorted(CNNS) + list(TRANSFER_ARCHS)}")
