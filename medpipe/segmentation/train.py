"""Train the U-Net with the shared loop (:func:`medpipe.training.loop.fit`); it predicts with
:mod:`medpipe.segmentation.predictor`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medpipe.segmentation.losses import DiceBCELoss
from medpipe.segmentation.metrics import dice_score
from medpipe.segmentation.predictor import input_normalization, to_data_size
from medpipe.segmentation.unet import build_unet
from medpipe.segmentation.unet_config import UNetSpec
from medpipe.training.config import TrainConfig
from medpipe.training.data import ArrayBatches
from medpipe.training.device import predict_batches
from medpipe.training.distributed import world
from medpipe.training.loop import FitResult, fit


def mean_dice(prob: np.ndarray, masks: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """Mean per-image Dice over all images (an empty prediction on an empty mask scores 1) and over lesion images."""
    pred = prob >= threshold
    scores = np.array([dice_score(t, p) for t, p in zip(masks, pred, strict=True)])
    lesion = masks.reshape(len(masks), -1).any(1)
    return float(scores.mean()), float(scores[lesion].mean()) if lesion.any() else float("nan")


def train_unet(
    train_images: np.ndarray, train_masks: np.ndarray, val_images: np.ndarray, val_masks: np.ndarray,
    spec: UNetSpec, cfg: TrainConfig, mean: Sequence[float], std: Sequence[float], seed: int,
    checkpoint_path: str | Path | None = None, on_epoch: Callable[[dict], None] | None = None,
    batch_metrics: Callable | None = None,
) -> tuple[nn.Module, FitResult]:
    """Train a U-Net on (N, H, W, 3) uint8 images and (N, H, W) 0/1 masks; the best epoch by validation Dice wins.

    Training batches are augmented online, images and masks with the same geometric transform.
    """
    mean, std = input_normalization(spec, mean, std)
    model = build_unet(spec.depth, spec.base_width, spec.encoder, spec.pretrained)
    loss = DiceBCELoss(spec.dice_weight, spec.bce_weight)
    rank, world_size = world()   # under DDP (train.processes > 1) each rank trains on its shard of every epoch
    train = ArrayBatches(train_images, train_masks, batch_size=cfg.batch_size, mean=mean, std=std,
                         size=spec.input_size, shuffle=True, drop_last=True, augment=cfg.augment,
                         targets_are_masks=True, seed=seed, rank=rank, world_size=world_size)
    val = ArrayBatches(val_images, val_masks, batch_size=64, mean=mean, std=std, size=spec.input_size,
                       targets_are_masks=True)
    size = val_masks.shape[1:]

    def loss_fn(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return loss(logits, masks)

    def val_fn(net: nn.Module) -> dict[str, float]:
        logits, masks = predict_batches(net, val, channels_last=cfg.channels_last)
        prob = to_data_size(logits, size)
        dice_all, dice_lesion = mean_dice(prob, val_masks)
        small = masks if tuple(masks.shape[-2:]) == tuple(logits.shape[-2:]) else None
        val_loss = float(loss(logits, small)) if small is not None else float("nan")
        return {"dice": dice_all, "dice_lesion": dice_lesion, "loss": val_loss}

    extra = {"unet": spec.model_dump(), "mean": mean, "std": std, "data_size": list(size),
             "precision": cfg.precision, "channels_last": cfg.channels_last}
    result = fit(model, train, loss_fn, val_fn, cfg, on_epoch=on_epoch, batch_metrics=batch_metrics,
                 checkpoint_path=checkpoint_path, checkpoint_extra=extra)
    return model, result


def batch_dice(logits: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Mean hard Dice of a training batch at threshold 0.5 (an empty/empty pair scores 1)."""
    pred = (logits.float() > 0).flatten(1)
    true = masks.reshape(pred.shape).bool()
    inter = (pred & true).sum(1).float()
    total = (pred.sum(1) + true.sum(1)).float()
    return {"dice": float(torch.where(total > 0, 2 * inter / total.clamp(min=1), 1.0).mean())}
