"""The ``segment`` section of params.yaml, validated before any heavy work."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medpipe.config import Strict
from medpipe.training.config import OnlineAugmentConfig, TrainConfig


class UNetConfig(Strict):
    """The U-Net and how it trains; the training knobs map onto the shared loop's ``TrainConfig``."""

    depth: int = Field(4, ge=1, le=5)          # down-sampling steps
    base_width: int = Field(16, ge=4, le=128)  # channels of the first level, doubled at each level
    encoder: Literal["scratch", "efficientnet_lite0"] = "scratch"
    pretrained: bool = True                    # ImageNet weights for the efficientnet_lite0 encoder
    input_size: int = Field(128, ge=32, le=1024)  # the network's side; predictions go back to the data size
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=2)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    scheduler: Literal["cosine", "onecycle", "plateau", "none"] = "cosine"
    patience: int = Field(8, ge=1)             # epochs without a better validation Dice before stopping
    dice_weight: float = Field(1.0, ge=0)
    bce_weight: float = Field(1.0, ge=0)
    precision: Literal["bf16", "fp32"] = "bf16"   # bf16 autocast on CPUs/GPUs that support it
    channels_last: bool = True
    postprocess: bool = True                   # clean-up as in ``segment.postprocess``
    augment: OnlineAugmentConfig = OnlineAugmentConfig()

    @model_validator(mode="after")
    def _consistent(self) -> UNetConfig:
        if self.dice_weight == 0 and self.bce_weight == 0:
            raise ValueError("dice_weight and bce_weight cannot both be 0")
        levels = 2 ** (min(self.depth, 4) + 1 if self.encoder == "efficientnet_lite0" else self.depth)
        if self.input_size % levels:
            raise ValueError(f"input_size ({self.input_size}) must be divisible by {levels} for depth {self.depth}")
        return self

    def train_config(self) -> TrainConfig:
        """The shared training loop's knobs, selecting the best epoch by validation Dice."""
        return TrainConfig(
            lr=self.lr, optimizer=self.optimizer, weight_decay=self.weight_decay, batch_size=self.batch_size,
            epochs=self.epochs, scheduler=self.scheduler, monitor="dice", monitor_mode="max",
            patience=self.patience, precision=self.precision, channels_last=self.channels_last,
            augment=self.augment, class_weights="none",
        )


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


class PostprocessConfig(Strict):
    """Morphological clean-up of predicted masks, for the methods whose ``postprocess`` is true."""

    min_area: int = Field(20, ge=0)             # px; smaller components are removed
    keep_components: int = Field(1, ge=0)       # keep the N largest components (0 = all)
    fill_holes: bool = True


class SegmentConfig(Strict):
    methods: tuple[Literal["unet", "pixel_classifier"], ...] = ("unet", "pixel_classifier")
    train_set: Literal["train", "train_augmented"] = "train"
    bootstrap_samples: int = Field(1000, ge=100)
    grid_images: int = Field(12, ge=0)          # images in the contour PNG of each method
    unet: UNetConfig = UNetConfig()
    pixel_classifier: PixelClassifierConfig = PixelClassifierConfig()
    postprocess: PostprocessConfig = PostprocessConfig()

    @model_validator(mode="after")
    def _some_method(self) -> SegmentConfig:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"segment.methods lists a method twice: {list(self.methods)}")
        return self
