"""Build any classifier of the pipeline from a plain, serialisable spec (as stored in checkpoints)."""

from __future__ import annotations

from typing import Any

from torch import nn

from medpipe.models.errors import ArchitectureError
from medpipe.models.registry import get_architecture, names

TRANSFER_ARCHS = names("transfer")  # kept for older callers; the registry is the list
DEFAULT_DROPOUT = {"cnn": 0.5, "transfer": 0.2}


def build_classifier(spec: dict[str, Any], pretrained: bool = True) -> nn.Module:
    """``spec``: arch, num_classes, input_size, dropout, and for transfer models weights and head.

    Missing optional keys take the defaults of older checkpoints (dropout 0.5 for a CNN, 0.2 for a
    transfer model; weights ``none``; head ``linear``). ``pretrained=False`` skips loading pretrained
    weights (used when a checkpoint supplies them).
    """
    missing = [key for key in ("arch", "num_classes") if key not in spec]
    if missing:
        raise ArchitectureError(f"the model spec {spec} lacks {missing}")
    arch = get_architecture(spec["arch"])
    return arch.build(
        num_classes=spec["num_classes"],
        input_size=spec.get("input_size"),
        dropout=spec.get("dropout", DEFAULT_DROPOUT[arch.family]),
        weights=spec.get("weights", "none") if pretrained else "none",
        head=spec.get("head", "linear"),
    )
