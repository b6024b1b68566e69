"""Classical segmentation: per-pixel features, a tree ensemble, and morphological clean-up.

Features of every pixel (grey level of the image, scaled to 0-1):
- scikit-image's ``multiscale_basic_features`` at sigmas ``sigma_min * 2**k`` up to ``sigma_max``:
  Gaussian-smoothed intensity (local mean), Sobel gradient magnitude, and the two Hessian
  eigenvalues (texture / blob-ness);
- the local variance (E[x^2] - E[x]^2 under the same Gaussian windows);
- optionally the normalised row and column (lesions sit mostly near the centre of the scan).
Training pixels are sampled per image with class balance (half lesion, half background where the
image has a lesion), so small lesions count as much as large ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
from scipy import ndimage
from skimage.feature import multiscale_basic_features
from sklearn.ensemble import ExtraTreesClassifier, HistGradientBoostingClassifier, RandomForestClassifier, VotingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from medpipe.segmentation.config import PixelClassifierConfig
from medpipe.segmentation.postprocess import to_masks


def sigmas(sigma_min: float, sigma_max: float) -> list[float]:
    out, s = [], sigma_min
    while s <= sigma_max + 1e-9:
        out.append(s)
        s *= 2
    return out


def to_grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 -> (H, W) float32 in 0-1."""
    image = np.asarray(image)
    grey = image.mean(axis=2) if image.ndim == 3 else image
    return (grey / 255.0).astype(np.float32)


def pixel_features(image: np.ndarray, sigma_min: float = 1.0, sigma_max: float = 16.0,
                   position: bool = True) -> np.ndarray:
    """(H, W, F) float32 features of every pixel of one image; F = 5 * len(sigmas) + 2 * position
    (4 from multiscale_basic_features and 1 variance per sigma, plus row and column)."""
    grey = to_grey(image)
    scales = sigmas(sigma_min, sigma_max)
    basic = multiscale_basic_features(grey, intensity=True, edges=True, texture=True, sigma_min=sigma_min,
                                      sigma_max=scales[-1], num_sigma=len(scales), workers=1)
    variances = []
    for s in scales:
        mean = ndimage.gaussian_filter(grey, s, mode="reflect")
        mean_sq = ndimage.gaussian_filter(grey * grey, s, mode="reflect")
        variances.append(np.maximum(mean_sq - mean * mean, 0.0))
    parts = [basic, np.stack(variances, axis=-1)]
    if position:
        h, w = grey.shape
        rows, cols = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        parts.append(np.stack([rows, cols], axis=-1))
    return np.concatenate(parts, axis=-1).astype(np.float32)


def sample_pixels(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of ``n`` pixels: half lesion and half background when the mask has a lesion."""
    flat = np.asarray(mask).ravel().astype(bool)
    lesion, background = np.flatnonzero(flat), np.flatnonzero(~flat)
    n_lesion = min(n // 2, len(lesion)) if len(lesion) else 0
    n_back = min(n - n_lesion, len(background))
    picks = []
    if n_lesion:
        picks.append(rng.choice(lesion, n_lesion, replace=len(lesion) < n_lesion))
    if n_back:
        picks.append(rng.choice(background, n_back, replace=False))
    return np.concatenate(picks) if picks else np.empty(0, dtype=np.int64)


def build_classifier(cfg: PixelClassifierConfig, seed: int) -> Pipeline:
    forest = RandomForestClassifier(n_estimators=cfg.n_estimators, max_depth=cfg.max_depth, min_samples_leaf=2,
                                    n_jobs=2, random_state=seed)
    if cfg.model == "random_forest":
        estimator = forest
    else:
        estimator = VotingClassifier(
            [
                ("random_forest", forest),
                ("extra_trees", ExtraTreesClassifier(n_estimators=cfg.n_estimators, max_depth=cfg.max_depth,
                                                     min_samples_leaf=2, n_jobs=2, random_state=seed)),
                ("gradient_boosting", HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1,
                                                                     random_state=seed)),
            ],
            voting="soft",
        )
    return Pipeline([("scale", StandardScaler()), ("classifier", estimator)])


@dataclass
class PixelSegmenter:
    """Features + classifier + clean-up as one object: ``fit(images, masks)``, ``predict(images)``."""

    cfg: PixelClassifierConfig
    seed: int = 0
    pipeline: Pipeline | None = field(default=None, repr=False)

    def features(self, image: np.ndarray) -> np.ndarray:
        return pixel_features(image, self.cfg.sigma_min, self.cfg.sigma_max, self.cfg.position)

    def fit(self, images: np.ndarray, masks: np.ndarray) -> PixelSegmenter:
        rng = np.random.default_rng(self.seed)
        xs, ys = [], []
        for image, mask in zip(images, masks, strict=True):
            idx = sample_pixels(mask, self.cfg.pixels_per_image, rng)
            feats = self.features(image)
            xs.append(feats.reshape(-1, feats.shape[-1])[idx])
            ys.append(np.asarray(mask).ravel()[idx].astype(np.int64))
        x, y = np.concatenate(xs), np.concatenate(ys)
        if len(np.unique(y)) < 2:
            raise ValueError("the training masks hold a single class: nothing to learn for the pixel classifier")
        self.pipeline = build_classifier(self.cfg, self.seed).fit(x, y)
        return self

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) lesion probabilities."""
        if self.pipeline is None:
            raise RuntimeError("PixelSegmenter.predict_proba before fit")
        out = np.empty(images.shape[:3], dtype=np.float32)
        for i, image in enumerate(images):
            feats = self.features(image)
            out[i] = self.pipeline.predict_proba(feats.reshape(-1, feats.shape[-1]))[:, 1].reshape(feats.shape[:2])
        return out

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) uint8 masks at ``cfg.threshold``, before any clean-up."""
        return (self.predict_proba(images) >= self.cfg.threshold).astype(np.uint8)

    @property
    def threshold(self) -> float:
        return self.cfg.threshold

    @property
    def postprocess(self) -> bool:
        return self.cfg.postprocess

    def predict_masks(self, images: np.ndarray, cleanup) -> np.ndarray:
        """Masks at ``cfg.threshold``, cleaned up as ``cleanup`` (``segment.cleanup``) says when ``cfg.postprocess``."""
        return to_masks(self.predict_proba(images), self.threshold, self.postprocess, cleanup)


def load(path: str | Path) -> PixelSegmenter:
    """The pixel classifier from its ``.joblib`` file (the loader ``train_pixel_classifier`` names in MLflow)."""
    return joblib.load(path)
