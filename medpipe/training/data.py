"""In-memory batches for the training loop: uint8 arrays in, normalised float NCHW tensors out.

The whole split is held once as a uint8 tensor (a 128 px BUSI training set is ~45 MB); each batch is
indexed, scaled to [0, 1], resized if the model wants another input size, augmented on the batch
(:mod:`medpipe.training.augment`) and normalised. Shuffling and the optional class-balancing
``WeightedRandomSampler`` draw from one seeded generator, so the same seed gives the same batches.

Under DistributedDataParallel each process builds the same ``ArrayBatches`` with its ``rank`` and the
``world_size``: every rank draws the same epoch order from the shared seed and keeps its own disjoint shard
(``order[rank::world_size]``, ``len // world_size`` indices, so every rank runs the same number of batches);
augmentation then draws from a generator of the rank's own, so ranks do not share their random transforms.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import WeightedRandomSampler

from medpipe.data.imageset import as_rows
from medpipe.config import ParamsError
from medpipe.training.augment import BatchAugment
from medpipe.training.config import OnlineAugmentConfig


def class_weights(labels: np.ndarray, num_classes: int, spec: str | Sequence[float] = "auto") -> torch.Tensor | None:
    """Loss weights per class: ``auto`` = N / (C * count) (sklearn's 'balanced'), ``none``, or an explicit list.

    A class absent from ``labels`` gets weight 0 under ``auto`` (it cannot contribute to the loss anyway).
    """
    if spec == "none":
        return None
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"class weights must be 'auto', 'none' or a list, got {spec!r}")
        counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
        weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
        return torch.tensor(weights, dtype=torch.float32)
    if len(spec) != num_classes:
        raise ParamsError(f"params.yaml: train.class_weights has {len(spec)} entries for {num_classes} classes")
    return torch.tensor(list(spec), dtype=torch.float32)


def sample_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Per-sample weights that make every class equally likely under a ``WeightedRandomSampler``."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    return torch.tensor(1.0 / counts[np.asarray(labels)], dtype=torch.double)


def to_float(images: torch.Tensor, size: int | None = None, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> torch.Tensor:
    """uint8 NCHW -> float NCHW in [0, 1], resized to ``size`` (antialiased) and normalised if mean/std given."""
    x = images.float().div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x, mean, std)


def normalize(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    if mean is None or std is None:
        return x
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def nchw_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) array -> contiguous uint8 (N, 3, H, W) tensor (one copy)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
    array = np.asarray(images)
    if not array.flags.writeable:  # memory-mapped rows: torch takes only memory it could write
        array = np.array(array)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def rank_seed(seed: int, rank: int) -> int:
    """A seed of rank ``rank``'s own, derived from the shared ``seed`` (distinct from it and from other ranks')."""
    return (seed + 1_000_003 * (rank + 1)) % 2**63


class ArrayBatches:
    """Re-iterable batches of ``(normalised float images, targets)``; each iteration is one epoch.

    ``targets``: int labels (N,) or, with ``targets_are_masks``, masks (N, H, W) that follow the
    images through resizing (nearest) and geometric augmentation.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        *,
        batch_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        size: int | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: OnlineAugmentConfig | None = None,
        balanced_sampler: bool = False,
        targets_are_masks: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes")
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
        self.images = as_rows(images)   # (N, H, W, C), in memory or memory-mapped: each batch reads its own rows
        # masks are read a batch at a time, as the images are; labels are small and live in memory
        self.targets = as_rows(targets) if targets_are_masks else torch.from_numpy(np.asarray(targets, dtype=np.int64))
        self.batch_size, self.size, self.mean, self.std = batch_size, size, mean, std
        self.shuffle, self.drop_last, self.targets_are_masks = shuffle, drop_last, targets_are_masks
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)   # the epoch order: the same on every rank
        # one process: augmentation shares the order's generator (as it always has: same seed, same bytes)
        own = self.generator if world_size == 1 else torch.Generator().manual_seed(rank_seed(seed, rank))
        self.augment = BatchAugment(augment, own) if augment is not None and augment.enabled else None
        self.sampler = None
        if balanced_sampler:
            if targets_are_masks:
                raise ValueError("a class-balancing sampler needs class labels, not masks")
            labels = np.asarray(targets)
            weights = sample_weights(labels, int(labels.max()) + 1)
            self.sampler = WeightedRandomSampler(weights, len(labels), replacement=True, generator=self.generator)

    def __len__(self) -> int:
        n = len(self.images) // self.world_size   # this rank's share of an epoch
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """The whole epoch's indices (the same on every rank: one draw from the shared seed)."""
        if self.sampler is not None:
            return torch.tensor(list(self.sampler), dtype=torch.long)
        if self.shuffle:
            return torch.randperm(len(self.images), generator=self.generator)
        return torch.arange(len(self.images))

    def order(self) -> torch.Tensor:
        """This rank's indices of the epoch: every ``world_size``-th from ``rank``, the tail that does not
        divide evenly left out (the order differs every epoch, so the left-out images do too)."""
        order = self.epoch_order()
        if self.world_size == 1:
            return order
        per_rank = len(order) // self.world_size
        return order[self.rank:per_rank * self.world_size:self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            if self.drop_last and len(index) < self.batch_size:
                break
            yield self.batch(index)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_float(nchw_uint8(self.images[index.numpy()]), self.size)
        y = torch.from_numpy(np.array(self.targets[index.numpy()])) if self.targets_are_masks else self.targets[index]
        if self.targets_are_masks and self.size is not None and tuple(y.shape[-2:]) != (self.size, self.size):
            y = F.interpolate(y[:, None].float(), size=(self.size, self.size), mode="nearest")[:, 0].to(y.dtype)
        if self.augment is not None:
            if self.targets_are_masks:
                x, y = self.augment(x, y)
            else:
                x = self.augment(x)
        return normalize(x, self.mean, self.std), y
