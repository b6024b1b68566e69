"""Offline augmentation and class balancing of the training split (images and masks jointly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from medpipe import config
from medpipe.config import AugmentConfig
from medpipe.data.imageset import ImageSet
from medpipe.io import write_json


class RandomTranspose(v2.Transform):
    """Swap height and width (a reflection about the main diagonal) with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"apply": bool(torch.rand(1) < self.p)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"] or not isinstance(inpt, torch.Tensor):
            return inpt
        out = inpt.transpose(-1, -2)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class RandomRot90(v2.Transform):
    """Rotate by a random multiple of 90 degrees."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, (1,)))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or params["k"] == 0:
            return inpt
        out = torch.rot90(inpt, params["k"], dims=(-2, -1))
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def build_transform(cfg: AugmentConfig) -> v2.Compose:
    """Geometric transforms move images and masks together; colour transforms leave masks alone."""
    steps: list[v2.Transform] = []
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.vflip:
        steps.append(v2.RandomVerticalFlip())
    if cfg.rot90:
        steps.append(RandomRot90())
    if cfg.transpose:
        steps.append(RandomTranspose())
    if cfg.rotate_degrees > 0:
        steps.append(v2.RandomRotation(cfg.rotate_degrees, interpolation=v2.InterpolationMode.BILINEAR))
    if cfg.brightness > 0 or cfg.contrast > 0:
        steps.append(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
    return v2.Compose(steps)


def augment_one(transform: v2.Compose, image: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply ``transform`` to one HWC uint8 image and its HW mask with the same random parameters."""
    img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    if mask is None:
        out = transform(img)
        return out.permute(1, 2, 0).numpy().copy(), None
    out, out_mask = transform(img, tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask))))
    return out.permute(1, 2, 0).numpy().copy(), out_mask.numpy().copy()


def balance_targets(counts: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """How many training images each class should have after balancing."""
    if cfg.balance == "none":
        return counts.copy()
    target = int(counts.max()) if cfg.target == "majority" else int(cfg.target)
    return np.maximum(counts, np.where(counts > 0, target, 0))


def augment_and_balance(train: ImageSet, cfg: AugmentConfig, seed: int) -> ImageSet:
    """The training split plus augmented copies of randomly drawn images of each minority class, so
    every class reaches its target count. Only training images are ever used as sources."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    transform = build_transform(cfg)
    counts = np.bincount(train.labels, minlength=train.num_classes)
    targets = balance_targets(counts, cfg)
    sources: list[int] = []
    for label, (have, want) in enumerate(zip(counts, targets, strict=True)):
        if want > have:
            members = np.flatnonzero(train.labels == label)
            sources.extend(rng.choice(members, size=int(want - have), replace=True).tolist())
    if not sources:
        return train
    index = np.array(sources, dtype=np.int64)
    copies = train.subset(index)
    images = np.empty_like(copies.images)
    masks = None if copies.masks is None else np.empty_like(copies.masks)
    for i in range(len(index)):
        image, mask = augment_one(transform, copies.images[i], None if masks is None else copies.masks[i])
        images[i] = image
        if masks is not None:
            masks[i] = mask
    ids = np.array([f"{sid}#aug{i}" for i, sid in enumerate(copies.source_ids)], dtype=str)
    augmented = ImageSet(
        images=np.concatenate([train.images, images]),
        labels=np.concatenate([train.labels, copies.labels]),
        class_names=train.class_names,
        source_ids=np.concatenate([train.source_ids, ids]),
        groups=np.concatenate([train.groups, copies.groups]),
        content_hashes=np.concatenate([train.content_hashes, copies.content_hashes]),
        phashes=np.concatenate([train.phashes, copies.phashes]),
        source_splits=np.concatenate([train.source_splits, copies.source_splits]),
        masks=None if masks is None else np.concatenate([train.masks, masks]),
    )
    return augmented


@dataclass(frozen=True)
class AugmentPaths:
    train: Path      # data/processed/train.npz
    out: Path        # data/processed/train_augmented.npz
    details: Path    # class counts before and after


def run(params: dict, paths: AugmentPaths) -> ImageSet:
    """Stage ``augment``: augmented copies balance the classes of the training split only."""
    cfg = config.load_section(params, "augment", AugmentConfig)
    data = ImageSet.load(paths.train)
    augmented = augment_and_balance(data, cfg, config.global_seed(params))
    augmented.save(paths.out)
    write_json(paths.details, {
        "balance": cfg.balance,
        "train_before": {"total": len(data), **data.class_counts()},
        "train_after": {"total": len(augmented), **augmented.class_counts()},
    })
    return augmented
