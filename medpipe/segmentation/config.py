"""The ``segment`` section of params.yaml, validated before any heavy work."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medpipe.config import Strict


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
