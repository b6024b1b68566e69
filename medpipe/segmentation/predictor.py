"""Segmenters rebuilt from the files the ``segment`` stage writes, behind one ``predict_proba(images)``.

- ``unet.pt``: a training-loop checkpoint whose ``extra`` holds the U-Net config and normalisation;
- ``pixel_classifier.joblib``: the fitted :class:`PixelSegmenter` (scikit-learn pipeline + config).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medpipe.segmentation.config import UNetConfig
from medpipe.segmentation.train import predict_unet
from medpipe.segmentation.unet import build_unet


class UNetSegmenter:
    def __init__(self, model: torch.nn.Module, cfg: UNetConfig, mean: list[float], std: list[float]) -> None:
        self.model, self.cfg, self.mean, self.std = model.eval(), cfg, mean, std

    @classmethod
    def load(cls, path: str | Path) -> UNetSegmenter:
        from medpipe.training.checkpoint import load_checkpoint

        state = load_checkpoint(path)
        extra = state["extra"]
        cfg = UNetConfig.model_validate(extra["unet"])
        model = build_unet(cfg.depth, cfg.base_width, cfg.encoder, pretrained=False)
        model.load_state_dict(state["model"])
        # the checkpoint holds the normalisation the network saw; pass it as the "data" statistics
        return cls(model, cfg.model_copy(update={"pretrained": False}), extra["mean"], extra["std"])

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return predict_unet(self.model, images, self.cfg, self.mean, self.std)


def load_segmenter(path: str | Path):
    path = Path(path)
    if path.suffix == ".pt":
        return UNetSegmenter.load(path)
    if path.suffix == ".joblib":
        import joblib

        return joblib.load(path)
    raise ValueError(f"unknown segmenter file {path}: expected a .pt U-Net checkpoint or a .joblib pixel classifier")
