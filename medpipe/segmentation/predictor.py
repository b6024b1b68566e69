"""The U-Net rebuilt from the file its training stage writes.

``models/<unet>/seed<k>/model.pt`` is a training-loop checkpoint whose ``extra`` holds the U-Net spec, the
normalisation and the inference precision. :class:`UNetSegmenter` and the pixel classifier's
:class:`~medpipe.segmentation.pixel_classifier.PixelSegmenter` both give ``predict_proba(images uint8 (N, H, W, 3)) -> (N, H, W)`` lesion probabilities and
``predict_masks(images, cleanup)``: thresholded and, where the segmenter asks for it, cleaned up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medpipe.segmentation.config import CleanupConfig, UNetSpec
from medpipe.segmentation.postprocess import to_masks
from medpipe.segmentation.train import predict_unet
from medpipe.segmentation.unet import build_unet
from medpipe.training.checkpoint import load_checkpoint


class UNetSegmenter:
    threshold = 0.5

    def __init__(self, model: torch.nn.Module, spec: UNetSpec, mean: list[float], std: list[float],
                 precision: str = "bf16", channels_last: bool = True) -> None:
        self.model, self.spec, self.mean, self.std = model.eval(), spec, mean, std
        self.precision, self.channels_last = precision, channels_last

    @property
    def postprocess(self) -> bool:
        return self.spec.postprocess

    @classmethod
    def load(cls, path: str | Path) -> UNetSegmenter:
        state = load_checkpoint(path)
        extra = state["extra"]
        spec = UNetSpec.model_validate(extra["unet"]).model_copy(update={"pretrained": False})
        model = build_unet(spec.depth, spec.base_width, spec.encoder, pretrained=False)
        model.load_state_dict(state["model"])
        # the checkpoint holds the normalisation the network saw; pass it as the "data" statistics
        return cls(model, spec, extra["mean"], extra["std"], extra.get("precision", "bf16"),
                   extra.get("channels_last", True))

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return predict_unet(self.model, images, self.spec, self.mean, self.std, self.precision, self.channels_last)

    def predict_masks(self, images: np.ndarray, cleanup: CleanupConfig) -> np.ndarray:
        return to_masks(self.predict_proba(images), self.threshold, self.postprocess, cleanup)


def load(path: str | Path) -> UNetSegmenter:
    """The U-Net saved in a training checkpoint (the loader the ``train_segmenter`` stage names in MLflow)."""
    return UNetSegmenter.load(path)
