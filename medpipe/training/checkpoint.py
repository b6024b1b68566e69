"""Self-describing checkpoints: weights plus everything needed to rebuild and judge them.

A checkpoint is a dict saved with ``torch.save``: ``model`` (state dict), ``optimizer``,
``scheduler`` (state dicts or None), ``epoch``, ``config`` (the training knobs), ``metrics`` (validation
metrics at that epoch) and ``extra`` (for classifiers: the architecture spec, class names, input size
and normalisation, which :class:`medpipe.training.predictor.TorchClassifier` rebuilds the model from).
It holds only tensors and plain Python values, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medpipe.io import atomic_path

FORMAT_VERSION = 1


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    epoch: int = 0,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    state = {
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "config": dict(config or {}),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "extra": dict(extra or {}),
    }
    # through a file object: given a path, torch names the archive's inner folder after the (random) temporary
    # file name, and the same weights would give other bytes on every run
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: run the training stage that writes it")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise ValueError(f"{path} is not a medpipe checkpoint (no 'model'/'format_version' entries)")
    return state


def resume(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
           scheduler: Any = None) -> dict[str, Any]:
    """Load weights (and optimiser/scheduler state where given) from a checkpoint; returns the checkpoint."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state
