"""Dice + binary cross-entropy on lesion logits, the usual loss for binary medical segmentation."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image, averaged over the batch.

    ``smooth`` keeps the loss defined (and near 0 for a confident empty prediction) on images whose
    mask is empty, such as BUSI's normal images.
    """
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    intersection = (prob * target).sum(1)
    denominator = prob.sum(1) + target.sum(1)
    return (1 - (2 * intersection + smooth) / (denominator + smooth)).mean()


class DiceBCELoss(nn.Module):
    """``dice_weight * soft Dice loss + bce_weight * BCE``; inputs are (N, 1, H, W) logits and 0/1 masks."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got dice {dice_weight}, bce {bce_weight}")
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.reshape(logits.shape).to(torch.float32)
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.bce_weight:
            loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(logits.float(), target)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, self.smooth)
        return loss
