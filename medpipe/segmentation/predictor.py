"""The U-Net rebuilt from the file its training stage writes.

``models/<unet>/seed<k>/model.pt`` is a training-loop checkpoint whose ``extra`` holds the U-Net spec, the
normalisation and the inference precision. :class:`UNetSegmenter` and the pixel classifier's
:class:`~medpipe.segmentation.pixel_classifier.PixelSegmenter` both give ``predict_proba(images uint8
(N, H, W, 3)) -> (N, H, W)`` lesion probabilities and ``predict_masks(images, cleanup)``: thresholded and,
where the segmenter asks for it, cleaned up. Prediction needs nothing of the U-Net's training code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medpipe.models.registry import input_normalization as registry_normalization
from medpipe.segmentation.config import CleanupConfig
from medpipe.segmentation.postprocess import to_masks
from medpipe.segmentation.unet import SCRATCH, build_unet
from medpipe.segmentation.unet_config import UNetSpec
from medpipe.training.checkpoint import load_checkpoint
from medpipe.training.data import ArrayBatches
from medpipe.training.device import autocast, predict_batches


def input_normalization(spec: UNetSpec, mean: Sequence[float], std: Sequence[float]) -> tuple[list, list]:
    """The (mean, std) the U-Net's inputs are normalised with: what a pretrained encoder's weights expect (the
    registry's :func:`~medpipe.models.registry.input_normalization`), else the data's own ``mean``/``std``."""
    expected = None if spec.encoder == SCRATCH else registry_normalization(spec.encoder,
                                                                           "imagenet" if spec.pretrained else "none")
    return (list(expected[0]), list(expected[1])) if expected else (list(mean), list(std))


def to_data_size(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N, 1, h, w) logits -> (N, H, W) float32 probabilities at the data's size (bilinear on logits)."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(logits.float())[:, 0].numpy()


def predict_unet(model: nn.Module, images: np.ndarray, spec: UNetSpec, mean: Sequence[float],
                 std: Sequence[float], precision: str = "bf16", channels_last: bool = True,
                 batch_size: int = 64) -> np.ndarray:
    """(N, H, W) lesion probabilities for (N, H, W, 3) uint8 images, at the images' own size."""
    mean, std = input_normalization(spec, mean, std)
    batches = ArrayBatches(images, np.zeros(len(images), dtype=np.int64), batch_size=batch_size, mean=mean,
                           std=std, size=spec.input_size)
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode(), autocast(device, precision):
        logits, _ = predict_batches(model, batches, channels_last=channels_last)
    return to_data_size(logits, images.shape[1:3])


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
