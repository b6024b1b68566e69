"""The array file every data stage reads and writes: uint8 NHWC images plus per-image metadata."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from medpipe.io import atomic_path


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64, index into class_names
    class_names: tuple[str, ...]
    source_ids: np.ndarray  # (N,) str: the file (or array index) each image came from
    groups: np.ndarray  # (N,) str: lesion/patient id from metadata, '' where unknown
    content_hashes: np.ndarray  # (N,) str: SHA-256 of the decoded source pixels
    phashes: np.ndarray  # (N,) uint64: perceptual hash of the processed image
    source_splits: np.ndarray  # (N,) str: the source's own split ('' where it has none)
    masks: np.ndarray | None = None  # (N, S, S) uint8 0/1 where the dataset has masks

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[3] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray) and len(value) != n:
                raise ValueError(f"{f.name} has {len(value)} entries for {n} images")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"labels outside 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def subset(self, index: np.ndarray) -> ImageSet:
        index = np.asarray(index)
        return replace(
            self,
            **{
                f.name: getattr(self, f.name)[index]
                for f in fields(self)
                if isinstance(getattr(self, f.name), np.ndarray)
            },
        )

    def save(self, path: str | Path) -> None:
        arrays = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)
        }
        arrays["class_names"] = np.asarray(self.class_names)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> ImageSet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image set {path} does not exist: run the stage that writes it (dvc repro)")
        with np.load(path, allow_pickle=False) as data:
            values = {name: data[name] for name in data.files}
        values["class_names"] = tuple(str(c) for c in values["class_names"])
        values.setdefault("masks", None)
        return cls(**values)


def fold_file(folds_dir: str | Path, fold: int, name: str) -> Path:
    """``data/folds/fold<f>/<name>.npz``: an image set of one cross-validation fold (the ``folds`` stage's)."""
    return Path(folds_dir) / f"fold{fold}" / f"{name}.npz"


def missing_masks(train: ImageSet, val: ImageSet) -> str | None:
    """Why a segmenter cannot train on these splits (no masks, or no lesion to learn), else None."""
    if train.masks is None or val.masks is None:
        return "skipped: the dataset has no segmentation masks"
    if not train.masks.any():
        return "skipped: every training mask is empty: nothing to learn"
    return None


def concatenate(sets: list[ImageSet]) -> ImageSet:
    first = sets[0]
    if any(s.class_names != first.class_names for s in sets):
        raise ValueError("cannot concatenate image sets with different class names")
    merged = {}
    for f in fields(ImageSet):
        if f.name == "class_names":
            continue
        values = [getattr(s, f.name) for s in sets]
        merged[f.name] = None if any(v is None for v in values) else np.concatenate(values)
    return ImageSet(class_names=first.class_names, **merged)
