"""Offline augmentation and class balancing of the training split (images and masks jointly)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from medpipe import config
from medpipe.config import AugmentConfig
from medpipe.data.imageset import ImageSet, ImageSetWriter, concatenate
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


def balance_sources(train: ImageSet, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """The training images to copy, drawn at random within each class short of its target."""
    counts = np.bincount(train.labels, minlength=train.num_classes)
    targets = balance_targets(counts, cfg)
    sources: list[int] = []
    for label, (have, want) in enumerate(zip(counts, targets, strict=True)):
        if want > have:
            members = np.flatnonzero(train.labels == label)
            sources.extend(rng.choice(members, size=int(want - have), replace=True).tolist())
    return np.array(sources, dtype=np.int64)


def augmented_chunks(train: ImageSet, cfg: AugmentConfig, seed: int) -> Iterator[ImageSet]:
    """The training split, then augmented copies of randomly drawn images of each minority class so every
    class reaches its target count, a chunk at a time. Only training images are ever used as sources."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    transform = build_transform(cfg)
    index = balance_sources(train, cfg, rng)
    yield from train.chunks()
    copied = 0
    for chunk in train.subset(index).chunks():
        for i in range(len(chunk)):
            image, mask = augment_one(transform, chunk.images[i], None if chunk.masks is None else chunk.masks[i])
            chunk.images[i] = image
            if mask is not None:
                chunk.masks[i] = mask
        ids = np.array([f"{sid}#aug{copied + i}" for i, sid in enumerate(chunk.source_ids)], dtype=str)
        copied += len(chunk)
        yield replace(chunk, source_ids=ids)


def augment_and_balance(train: ImageSet, cfg: AugmentConfig, seed: int) -> ImageSet:
    """The augmented and balanced training split in memory (``augmented_chunks`` gathered)."""
    return concatenate(list(augmented_chunks(train, cfg, seed)) or [train])


def write_augmented(train: ImageSet, cfg: AugmentConfig, seed: int, path: Path) -> ImageSet:
    """Stream the augmented and balanced training split into the image-set folder ``path``."""
    with ImageSetWriter(path, train.image_size, train.class_names, train.masks is not None) as writer:
        for chunk in augmented_chunks(train, cfg, seed):
            writer.append(chunk)
    return ImageSet.load(path)


@dataclass(frozen=True)
class AugmentPaths:
    train: Path      # data/processed/train
    out: Path        # data/processed/train_augmented
    details: Path    # class counts before and after


def run(params: dict, paths: AugmentPaths) -> ImageSet:
    """Stage ``augment``: augmented copies balance the classes of the training split only."""
    cfg = config.load_section(params, "augment", AugmentConfig)
    data = ImageSet.load(paths.train)
    augmented = write_augmented(data, cfg, config.global_seed(params), paths.out)
    write_json(paths.details, {
        "balance": cfg.balance,
        "train_before": {"total": len(data), **data.class_counts()},
        "train_after": {"total": len(augmented), **augmented.class_counts()},
    })
    return augmented
