"""Image descriptors as scikit-learn transformers: uint8 images (N, H, W, 3) in, float32 features out.

Every extractor is stateless apart from its settings (``fit`` learns nothing), so one fitted
:class:`~sklearn.pipeline.FeatureUnion` can both extract the features once for all models during
training and sit as the first step of every saved model, which then takes raw images.
"""

from __future__ import annotations

import hashlib
import logging

import cv2
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import FeatureUnion
from skimage.feature import graycomatrix, graycoprops, hog, local_binary_pattern

from medpipe.errors import UserError
from medpipe.classical.config import FEATURES, ClassicalConfig
from medpipe.models.efficientnet import efficientnet_lite0

log = logging.getLogger(__name__)


class UnknownFeatureError(UserError, ValueError):
    """A feature name that no extractor implements."""


def check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def to_gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size: area averaging when shrinking, bilinear when enlarging."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrink = size < image.shape[0]
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class ImageFeatures(TransformerMixin, BaseEstimator):
    """Base class: ``transform`` maps each image through ``_one`` and stacks the vectors."""

    def fit(self, images: np.ndarray, y: np.ndarray | None = None) -> ImageFeatures:
        check_images(images)
        self.n_features_out_ = len(self._one(np.asarray(images[0])))
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images)
        return np.stack([self._one(image) for image in images]).astype(np.float32, copy=False)

    def _one(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        prefix = type(self).__name__.lower()
        return np.asarray([f"{prefix}{i}" for i in range(self.n_features_out_)], dtype=object)


class RawPixels(ImageFeatures):
    """Downscaled pixels on the 0-1 scale (grey or RGB)."""

    def __init__(self, size: int = 32, grayscale: bool = True):
        self.size = size
        self.grayscale = grayscale

    def _one(self, image: np.ndarray) -> np.ndarray:
        if self.grayscale:
            image = to_gray(image)
        return resize(image, self.size).reshape(-1).astype(np.float32) / 255.0


class Hog(ImageFeatures):
    """Histogram of oriented gradients of the grey image resized to size x size."""

    def __init__(self, size: int = 64, orientations: int = 9, pixels_per_cell: int = 8, cells_per_block: int = 2):
        self.size = size
        self.orientations = orientations
        self.pixels_per_cell = pixels_per_cell
        self.cells_per_block = cells_per_block

    def _one(self, image: np.ndarray) -> np.ndarray:
        gray = resize(to_gray(image), self.size)
        return hog(
            gray,
            orientations=self.orientations,
            pixels_per_cell=(self.pixels_per_cell, self.pixels_per_cell),
            cells_per_block=(self.cells_per_block, self.cells_per_block),
            block_norm="L2-Hys",
            feature_vector=True,
        )


class Histogram(ImageFeatures):
    """Normalised intensity histogram per RGB channel plus quantiles of the grey level."""

    def __init__(self, bins: int = 32):
        self.bins = bins

    def _one(self, image: np.ndarray) -> np.ndarray:
        n = image.shape[0] * image.shape[1]
        channels = [
            np.bincount((image[..., c].reshape(-1).astype(np.int64) * self.bins) >> 8, minlength=self.bins) / n
            for c in range(3)
        ]
        quantiles = np.percentile(to_gray(image), [5, 25, 50, 75, 95]) / 255.0
        return np.concatenate([*channels, quantiles])


class Lbp(ImageFeatures):
    """Rotation-invariant uniform local binary pattern histograms at several radii (texture)."""

    def __init__(self, radii: tuple[int, ...] = (1, 2, 3), points: int = 8):
        self.radii = radii
        self.points = points

    def _one(self, image: np.ndarray) -> np.ndarray:
        gray = to_gray(image)
        hists = []
        for radius in self.radii:
            p = self.points * radius if radius > 1 else self.points
            codes = local_binary_pattern(gray, p, radius, method="uniform")  # values 0..p+1
            hist = np.bincount(codes.astype(np.int64).reshape(-1), minlength=p + 2)
            hists.append(hist / hist.sum())
        return np.concatenate(hists)


class Glcm(ImageFeatures):
    """Grey-level co-occurrence statistics (Haralick-style), averaged over four directions."""

    PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")

    def __init__(self, distances: tuple[int, ...] = (1, 2, 4), levels: int = 32):
        self.distances = distances
        self.levels = levels

    def _one(self, image: np.ndarray) -> np.ndarray:
        gray = (to_gray(image).astype(np.int64) * self.levels >> 8).astype(np.uint8)
        angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
        glcm = graycomatrix(gray, list(self.distances), angles, levels=self.levels, symmetric=True, normed=True)
        # (distances, angles) per property -> mean over angles: rotation-tolerant
        return np.concatenate([graycoprops(glcm, p).mean(axis=1) for p in self.PROPS])


class Embedding(ImageFeatures):
    """Pooled 1280-d features of the ImageNet-pretrained EfficientNet-Lite0 backbone (frozen).

    The backbone comes from :func:`medpipe.models.efficientnet.efficientnet_lite0`. It is not pickled
    with the model: it is rebuilt on first use after loading, and a SHA-256 of its weights, taken
    when fitting, guards against a different weights file silently changing the features.
    """

    def __init__(self, size: int | None = None, batch_size: int = 64, pretrained: bool = True,
                 min_size: int | None = None):
        self.size = size
        self.min_size = min_size
        self.batch_size = batch_size
        self.pretrained = pretrained

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_backbone", None)
        return state

    def _model(self):
        backbone = self.__dict__.get("_backbone")
        if backbone is None:
            import torch

            backbone = efficientnet_lite0(num_classes=0, pretrained=self.pretrained).eval()
            backbone = backbone.to(memory_format=torch.channels_last)
            digest = weights_digest(backbone)
            expected = self.__dict__.get("weights_sha256_")
            if expected is not None and expected != digest:
                raise RuntimeError(
                    f"EfficientNet-Lite0 weights differ from those this model was fitted with "
                    f"(sha256 {digest[:12]} != {expected[:12]}): install the same weights package"
                )
            self.weights_sha256_ = digest
            self._backbone = backbone
        return backbone

    def input_size(self, height: int) -> int:
        """Side length the backbone sees: ``size``, else the image's, raised to ``min_size``."""
        if self.size is not None:
            return self.size
        return max(height, self.min_size) if self.min_size is not None else height

    def fit(self, images: np.ndarray, y: np.ndarray | None = None) -> Embedding:
        check_images(images)
        self._model()
        self.n_features_out_ = int(self.transform(np.asarray(images[:1])).shape[1])
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        import torch

        images = check_images(images)
        model = self._model()
        out = []
        with torch.inference_mode():
            side = self.input_size(images.shape[1])
            for start in range(0, len(images), self.batch_size):
                batch = images[start:start + self.batch_size]
                if side != images.shape[1] or side != images.shape[2]:
                    batch = np.stack([resize(image, side) for image in batch])
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
                x = ((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)
                out.append(model(x).float().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


def weights_digest(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def make_extractor(name: str, cfg: ClassicalConfig) -> ImageFeatures:
    """One extractor from its name in params (``classical.features``) and its settings."""
    if name == "raw":
        return RawPixels(size=cfg.raw.size, grayscale=cfg.raw.grayscale)
    if name == "hog":
        return Hog(cfg.hog.size, cfg.hog.orientations, cfg.hog.pixels_per_cell, cfg.hog.cells_per_block)
    if name == "histogram":
        return Histogram(bins=cfg.histogram.bins)
    if name == "lbp":
        return Lbp(radii=tuple(cfg.lbp.radii), points=cfg.lbp.points)
    if name == "glcm":
        return Glcm(distances=tuple(cfg.glcm.distances), levels=cfg.glcm.levels)
    if name == "embedding":
        return Embedding(size=cfg.embedding.size, batch_size=cfg.embedding.batch_size,
                         min_size=cfg.embedding.min_size)
    raise UnknownFeatureError(f"unknown feature {name!r}; choose from {list(FEATURES)}")


def make_features(cfg: ClassicalConfig) -> FeatureUnion:
    """The combined extractor: the listed features side by side, in the listed order."""
    return FeatureUnion([(name, make_extractor(name, cfg)) for name in cfg.features])


def feature_blocks(union: FeatureUnion) -> dict[str, int]:
    """Width of each fitted extractor's block in the concatenated feature vector."""
    return {name: int(step.n_features_out_) for name, step in union.transformer_list}
