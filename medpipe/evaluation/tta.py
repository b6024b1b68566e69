"""Test-time augmentation: average a model's probabilities over label-preserving views of each image.

Views are made on the uint8 images every predictor accepts, so TTA needs nothing from a model but
``predict_proba``; the noisy views come from a seeded generator (same inputs -> same outputs). A segmenter's
probability map of a view is mapped back onto the image by the view's inverse before the average. Noisy views are
off by default: a model trained without noise can be far from invariant to it (EfficientNet-Lite0 on
brain-tumor-4class: test accuracy 0.934 plain, 0.844 with Gaussian noise of std 0.02 on every image).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from medpipe.evaluation.config import TTAConfig

Transform = Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _hflip(x: np.ndarray) -> np.ndarray:
    return x[:, :, ::-1]


def _vflip(x: np.ndarray) -> np.ndarray:
    return x[:, ::-1]


class View(NamedTuple):
    """One TTA view of a batch (N, H, W[, C]): ``forward`` makes it, ``inverse`` maps a per-pixel map back."""

    name: str
    forward: Transform
    inverse: Transform = _same


def _turned(view: View, k: int) -> View:
    """``view`` turned by ``k`` quarter turns (axes 1 and 2: images and per-pixel maps alike)."""
    return View(f"{view.name}+rot{90 * k}",
                lambda x: np.rot90(view.forward(x), k, axes=(1, 2)),
                lambda y: view.inverse(np.rot90(y, -k, axes=(1, 2))))


def tta_views(cfg: TTAConfig, seed: int = 0) -> list[View]:
    """The named views ``cfg`` asks for, the unchanged image first.

    With ``rot90`` every flip view also comes turned by 90, 180 and 270 degrees: with ``hflip`` these are the 8
    symmetries of the square, which already hold the vertical flip (a horizontal flip turned by 180 degrees), so
    ``vflip`` adds no view of its own then. Noise views change no pixel's place: their inverse is the identity.
    """
    views = [View("identity", _same)]
    if cfg.hflip:
        views.append(View("hflip", _hflip, _hflip))
    if cfg.vflip and not (cfg.rot90 and cfg.hflip):
        views.append(View("vflip", _vflip, _vflip))
    if cfg.rot90:
        views += [_turned(view, k) for view in list(views) for k in (1, 2, 3)]
    for i in range(cfg.noise_copies):
        def noisy(x: np.ndarray, i: int = i) -> np.ndarray:
            rng = np.random.default_rng([seed, i])
            # one noise field for all channels: a grey image stays grey (per-channel noise turns it into
            # colour speckle that no training image had)
            noise = rng.normal(0.0, cfg.noise_std * 255.0, size=x.shape[:-1] + (1,))
            return np.clip(np.rint(x.astype(np.float64) + noise), 0, 255).astype(np.uint8)
        views.append(View(f"noise{i}", noisy))
    return views


def predict_proba_tta(model, images: np.ndarray, cfg: TTAConfig, seed: int = 0, per_pixel: bool = False
                      ) -> np.ndarray:
    """Mean of ``model.predict_proba`` over the TTA views of ``images`` (uint8, N x H x W x 3).

    ``per_pixel``: the model predicts a map per image (a segmenter's (N, H, W) lesion probabilities); each view's
    map is turned back onto the image before the average.
    """
    total = None
    views = tta_views(cfg, seed)
    for view in views:
        proba = np.asarray(model.predict_proba(np.ascontiguousarray(view.forward(images))), dtype=np.float64)
        proba = view.inverse(proba) if per_pixel else proba
        total = proba if total is None else total + proba
    return total / len(views)
