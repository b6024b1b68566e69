"""The ``segment`` section of params.yaml, validated before any heavy work."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medpipe.config import Strict
from medpipe.training.config import ModelSpec, TrainConfig


class UNetSpec(ModelSpec):
    """The U-Net entry of ``models``: its shape, its loss, its clean-up; training follows the shared ``train``."""

    arch: Literal["unet"] = "unet"
    depth: int = Field(4, ge=1, le=5)          # down-sampling steps
    base_width: int = Field(16, ge=4, le=128)  # channels of the first level, doubled at each level
    encoder: str = "scratch"                   # scratch | an EfficientNet-Lite of the architecture registry
    pretrained: bool = True                    # ImageNet weights for a pretrained encoder
    input_size: int = Field(128, ge=32, le=1024)  # the network's side; predictions go back to the data size
    dice_weight: float = Field(1.0, ge=0)
    bce_weight: float = Field(1.0, ge=0)
    postprocess: bool = True                   # clean-up as in ``segment.cleanup``

    @model_validator(mode="after")
    def _consistent(self) -> UNetSpec:
        if self.dice_weight == 0 and self.bce_weight == 0:
            raise ValueError("dice_weight and bce_weight cannot both be 0")
        levels = 2 ** (min(self.depth, 4) + 1 if self.encoder != "scratch" else self.depth)
        if self.input_size % levels:
            raise ValueError(f"input_size ({self.input_size}) must be divisible by {levels} for depth {self.depth}")
        return self

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The shared recipe and this model's overrides; the best epoch is the one with the best validation Dice."""
        return super().train_config(base).updated(monitor="dice", monitor_mode="max", class_weights="none",
                                                  sampler="none")


class PixelClassifierConfig(Strict):
    model: Literal["random_forest", "voting"] = "voting"
    pixels_per_image: int = Field(300, ge=10)   # sampled per training image, half lesion, half background
    n_estimators: int = Field(60, ge=1)
    max_depth: int | None = Field(14, ge=1)
    sigma_min: float = Field(1.0, gt=0)
    sigma_max: float = Field(16.0, gt=0)
    position: bool = True                       # add the normalised row/column as features
    threshold: float = Field(0.5, gt=0, lt=1)
    postprocess: bool = True

    @model_validator(mode="after")
    def _sigmas(self) -> PixelClassifierConfig:
        if self.sigma_max < self.sigma_min:
            raise ValueError("segment.pixel_classifier.sigma_max must be >= sigma_min")
        return self


class CleanupConfig(Strict):
    """Morphological clean-up of predicted masks, for the methods whose ``postprocess`` is true."""

    min_area: int = Field(20, ge=0)             # px; smaller components are removed
    keep_components: int = Field(1, ge=0)       # keep the N largest components (0 = all)
    fill_holes: bool = True


class SegmentConfig(Strict):
    """The ``segment`` section: what segmenters train on, the pixel classifier, the mask clean-up."""

    train_set: Literal["train", "train_augmented"] = "train"
    pixel_classifier: PixelClassifierConfig = PixelClassifierConfig()
    cleanup: CleanupConfig = CleanupConfig()
