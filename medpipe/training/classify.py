"""Train one deep classifier and keep its best epoch (the ``train`` stage calls this for classifiers).

Transfer models with pretrained weights train progressively: the new head alone for
``train.unfreeze.head_epochs`` epochs (frozen BatchNorm statistics), then deeper block groups join
every ``step_epochs`` epochs at ``backbone_lr_factor`` times the head's learning rate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medpipe import config
from medpipe.data.imageset import ImageSet
from medpipe.metrics import classification_metrics
from medpipe.models.factory import build_classifier
from medpipe.models.registry import default_input_size, input_normalization
from medpipe.training.config import ClassifierSpec, TrainConfig, UnfreezeConfig
from medpipe.training.data import ArrayBatches, class_weights
from medpipe.training.device import predict_batches
from medpipe.training.distributed import world
from medpipe.training.loop import FitResult, fit
from medpipe.training.predictor import TorchClassifier

log = logging.getLogger(__name__)

def set_trainable_groups(groups: list[nn.Module], n_trainable: int) -> None:
    """Train the ``n_trainable`` deepest groups; freeze the rest and keep their BatchNorm statistics fixed."""
    cut = len(groups) - n_trainable
    for i, group in enumerate(groups):
        trainable = i >= cut
        for p in group.parameters():
            p.requires_grad_(trainable)
        if not trainable:
            for m in group.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def unfreezing(model: nn.Module, schedule: UnfreezeConfig) -> tuple[list[dict], Callable[[int, nn.Module], None]]:
    """Param groups (head at lr, backbone at ``backbone_lr_factor``) and the ``before_epoch`` hook."""
    groups = model.groups()
    backbone = [p for g in groups for p in g.parameters()]
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    param_groups = [{"params": head, "lr": 1.0}, {"params": backbone, "lr": schedule.backbone_lr_factor}]

    def before_epoch(epoch: int, module: nn.Module) -> None:
        n = schedule.trainable_groups(epoch, len(groups))
        set_trainable_groups(groups, n)
        log.info("epoch %d: %d of %d backbone groups trainable", epoch + 1, n, len(groups))

    return param_groups, before_epoch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Share of the batch whose top class is the label (for mixed batches: the larger share of the mix)."""
    if labels.ndim == 2:
        labels = labels.argmax(1)
    return {"accuracy": float((logits.argmax(1) == labels).float().mean())}


class MixedBatches:
    """Training batches mixed with their own reverse (timm's ``Mixup``): mixup or cutmix per batch, with
    ``train.mix_prob``; targets become class probabilities (the cross-entropy takes them as they are).

    The mixing draws come from numpy's global generator, which ``seed_everything`` seeds."""

    def __init__(self, batches: ArrayBatches, cfg: TrainConfig, num_classes: int) -> None:
        from timm.data import Mixup

        self.batches, self.world_size = batches, batches.world_size
        self.mix = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                         label_smoothing=0.0, num_classes=num_classes)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for images, labels in self.batches:
            yield self.mix(images, labels)


def model_spec_dict(spec: ClassifierSpec, num_classes: int, input_size: int) -> dict[str, Any]:
    """The serialisable architecture spec a checkpoint stores (what ``build_classifier`` takes)."""
    return {"arch": spec.arch, "num_classes": num_classes, "input_size": input_size, "dropout": spec.dropout,
            "weights": spec.weights, "head": spec.head}


def train_classifier(name: str, spec: ClassifierSpec, cfg: TrainConfig, train: ImageSet, val: ImageSet,
                     normalization: dict, checkpoint: Path | None, seed: int,
                     on_epoch: Callable[[dict], None] | None = None) -> tuple[TorchClassifier, FitResult]:
    """Train one classifier; the returned classifier holds the best-by-validation weights."""
    config.seed_everything(seed, deterministic=cfg.deterministic)
    num_classes = len(train.class_names)
    input_size = spec.input_size or default_input_size(spec.arch, train.image_size)
    pretrained = spec.pretrained
    if pretrained:
        mean, std = input_normalization(spec.arch, spec.weights)
    else:
        mean, std = tuple(normalization["mean"]), tuple(normalization["std"])
    arch_spec = model_spec_dict(spec, num_classes, input_size)
    model = build_classifier(arch_spec, pretrained=True)

    weights = class_weights(train.labels, num_classes, cfg.class_weights)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    plain_ce = nn.CrossEntropyLoss()
    rank, world_size = world()   # under DDP (train.processes > 1) each rank trains on its shard of every epoch
    batch_size = max(1, min(cfg.batch_size, len(train) // world_size))
    if cfg.mixes:
        batch_size = max(2, batch_size - batch_size % 2)   # each image is mixed with another of its batch
    train_batches = ArrayBatches(
        train.images, train.labels, batch_size=batch_size, mean=mean,
        std=std, size=input_size, shuffle=True, drop_last=True, augment=cfg.augment,
        balanced_sampler=cfg.sampler == "weighted", seed=seed, rank=rank, world_size=world_size,
    )
    if cfg.mixes:
        train_batches = MixedBatches(train_batches, cfg, num_classes)
    val_batches = ArrayBatches(val.images, val.labels, batch_size=128, mean=mean, std=std, size=input_size)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return criterion(logits.float(), labels)

    def val_fn(module: nn.Module) -> dict[str, float]:
        logits, labels = predict_batches(module, val_batches, channels_last=cfg.channels_last)
        metrics = classification_metrics(labels.numpy(), torch.softmax(logits, 1).numpy())
        metrics["loss"] = float(plain_ce(logits, labels))
        return metrics

    param_groups, before_epoch = (None, None)
    if pretrained and hasattr(model, "groups"):
        param_groups, before_epoch = unfreezing(model, cfg.unfreeze)

    classifier = TorchClassifier(model, name, train.class_names, input_size, mean, std, arch_spec)
    result = fit(
        model, train_batches, loss_fn, val_fn, cfg, param_groups=param_groups, before_epoch=before_epoch,
        on_epoch=on_epoch, batch_metrics=accuracy, checkpoint_path=checkpoint,
        checkpoint_extra={**classifier.extra(), "seed": seed},
    )
    model.to("cpu").to(memory_format=torch.contiguous_format)
    for p in model.parameters():
        p.requires_grad_(True)
    return classifier, result
