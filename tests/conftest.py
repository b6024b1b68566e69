"""Shared test fixtures: small generated images and archives laid out like the real datasets."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medpipe.data.imageset import ImageSet

# `.venv/bin/python -m pytest` without an activated venv: the dvc, mlflow and medpipe-* commands the tests run are
# the ones installed beside this interpreter
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# the `project` fixture (a copy of the repository on a tiny dataset) for the tests that run real dvc/mlflow
pytest_plugins = ("tests.dvc_project",)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG") if mode else Image.fromarray(array).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def synthetic_scan(rng: np.random.Generator, label: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A grey 'scan' with a bright blob whose shape depends on the label, and the blob's mask."""
    image = rng.integers(20, 60, size=(size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
    radius = size // 8 + 2 * label
    if label == 1:
        blob = (np.abs(yy - cy) < radius) & (np.abs(xx - cx) < radius)
    else:
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    image[blob] = 200
    return np.stack([image] * 3, axis=2), blob


def make_class_zip(path: Path, n_per_class: int = 12, classes=("benign", "malignant", "normal"), seed: int = 0,
                   with_masks: bool = True, extras: dict[str, bytes] | None = None, size: int = 48) -> Path:
    """A zip of class folders like BUSI: <root>/<class>/<class> (i).png plus <class> (i)_mask.png."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for label, name in enumerate(classes):
            for i in range(n_per_class):
                image, blob = synthetic_scan(rng, label, size)
                zf.writestr(f"root/{name}/{name} ({i}).png", png_bytes(image))
                if with_masks:
                    mask = (blob if name != "normal" else np.zeros_like(blob)).astype(np.uint8) * 255
                    zf.writestr(f"root/{name}/{name} ({i})_mask.png", png_bytes(mask))
        for member, data in (extras or {}).items():
            zf.writestr(member, data)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
    """Integration tests (real dvc/mlflow in a copied project) are slow too: `-m "not slow"` leaves them out."""
    for item in items:
        if item.get_closest_marker("integration") is not None:
            item.add_marker(pytest.mark.slow)


def make_set(n_per_class=(8, 6, 5), size: int = 12, seed: int = 0, masks: bool = False,
             class_names=("benign", "malignant", "normal")) -> ImageSet:
    """Images with a class-dependent bright corner; with ``masks``, a bright lesion square in every image
    but those of the last class (BUSI's 'normal'), and its mask."""
    rng = np.random.default_rng(seed)
    images, labels, lesions = [], [], []
    for label, n in enumerate(n_per_class):
        for _ in range(n):
            img = rng.integers(0, 120, size=(size, size, 3))
            img[: size // 2, : size // 2] += 40 * label  # class-dependent bright corner
            lesion = np.zeros((size, size), np.uint8)
            if masks and label != len(n_per_class) - 1:
                side = size // 3
                top, left = rng.integers(size // 4, size - side, size=2)
                lesion[top:top + side, left:left + side] = 1
                img[lesion.astype(bool)] = 230
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(label)
            lesions.append(lesion)
    n = len(labels)
    return ImageSet(
        images=np.stack(images), labels=np.array(labels, dtype=np.int64), class_names=tuple(class_names),
        source_ids=np.array([f"img{i}" for i in range(n)]), groups=np.full(n, ""),
        content_hashes=np.array([f"h{i}" for i in range(n)]), phashes=np.zeros(n, dtype=np.uint64),
        source_splits=np.full(n, ""), masks=np.stack(lesions) if masks else None,
    )


def distinct(data: ImageSet, prefix: str, seed: int) -> ImageSet:
    """``data`` with unique source ids and content hashes, and perceptual hashes far apart (no near-duplicates)."""
    rng = np.random.default_rng(seed)
    n = len(data)
    return dataclasses.replace(
        data, source_ids=np.array([f"{prefix}{i}" for i in range(n)]),
        content_hashes=np.array([f"{prefix}h{i}" for i in range(n)]),
        phashes=rng.integers(0, 2**63, size=n, dtype=np.uint64))
