"""Morphological clean-up of a predicted binary mask (used by every segmenter whose ``postprocess`` is on)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from skimage import morphology

if TYPE_CHECKING:
    from medpipe.segmentation.config import CleanupConfig


def postprocess(mask: np.ndarray, min_area: int = 20, keep_components: int = 1, fill_holes: bool = True) -> np.ndarray:
    """Remove components smaller than ``min_area``, keep the ``keep_components`` largest, fill holes."""
    mask = np.asarray(mask).astype(bool)
    if min_area > 0:
        mask = morphology.remove_small_objects(mask, max_size=min_area - 1) if min_area > 1 else mask
    labels, count = ndimage.label(mask)
    if keep_components and count > keep_components:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.argsort(sizes)[::-1][:keep_components] + 1
        mask = np.isin(labels, keep)
    return (ndimage.binary_fill_holes(mask) if fill_holes else mask).astype(np.uint8)


def to_masks(prob: np.ndarray, threshold: float, clean: bool, cleanup: CleanupConfig) -> np.ndarray:
    """Probabilities -> 0/1 masks at ``threshold``, each cleaned up (``segment.cleanup``) when ``clean``."""
    masks = (prob >= threshold).astype(np.uint8)
    if clean:
        masks = np.stack([postprocess(m, cleanup.min_area, cleanup.keep_components, cleanup.fill_holes)
                          for m in masks])
    return masks
