"""The optimiser and learning-rate schedule of ``train``: Adam/AdamW/SGD; cosine annealing, one-cycle (stepped
after every batch), ReduceLROnPlateau."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from medpipe.training.config import TrainConfig


def build_optimizer(params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Optimizer over ``params`` (tensors or param groups whose ``lr`` is a factor of ``cfg.lr``)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "lr": cfg.lr * g.get("lr", 1.0)} for g in params]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int | None = None):
    """The ``train.scheduler``; ``onecycle`` (stepped after every batch) needs the number of batches per epoch."""
    if cfg.scheduler == "onecycle":
        if not steps_per_epoch:
            raise ValueError("train.scheduler 'onecycle' needs training batches whose number is known (len())")
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=cfg.epochs * steps_per_epoch, pct_start=cfg.onecycle_pct_start,
        )
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=cfg.monitor_mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience,
            min_lr=cfg.min_lr,
        )
    return None


def step_epoch_scheduler(scheduler: Any, score: float, per_batch: bool) -> None:
    """End-of-epoch scheduler step (plateau sees the score; one-cycle steps per batch instead)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(score)
    elif scheduler is not None and not per_batch:
        scheduler.step()
