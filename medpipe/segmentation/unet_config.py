"""The U-Net's entry of ``models`` (``arch: unet``): its shape, its loss, its clean-up; it trains on the shared
``train`` recipe (:class:`medpipe.training.config.ModelSpec`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medpipe.segmentation.unet import SCRATCH, input_multiple
from medpipe.training.config import ModelSpec, TrainConfig


class UNetSpec(ModelSpec):
    """The U-Net entry of ``models``: its shape, its loss, its clean-up; training follows the shared ``train``."""

    arch: Literal["unet"] = "unet"
    depth: int = Field(4, ge=1, le=5)          # down-sampling steps
    base_width: int = Field(16, ge=4, le=128)  # channels of the first level, doubled at each level
    encoder: str = SCRATCH                     # scratch | an EfficientNet-Lite of the architecture registry
    pretrained: bool = True                    # ImageNet weights for a pretrained encoder
    input_size: int = Field(128, ge=32, le=1024)  # the network's side; predictions go back to the data size
    dice_weight: float = Field(1.0, ge=0)
    bce_weight: float = Field(1.0, ge=0)
    postprocess: bool = True                   # clean-up as in ``segment.cleanup``

    @model_validator(mode="after")
    def _consistent(self) -> UNetSpec:
        if self.dice_weight == 0 and self.bce_weight == 0:
            raise ValueError("dice_weight and bce_weight cannot both be 0")
        levels = input_multiple(self.depth, self.encoder)   # an unknown encoder fails here, with the known ones
        if self.input_size % levels:
            raise ValueError(f"input_size ({self.input_size}) must be divisible by {levels} for depth {self.depth}")
        return self

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The shared recipe and this model's overrides; the best epoch is the one with the best validation Dice."""
        return super().train_config(base).updated(monitor="dice", monitor_mode="max", class_weights="none",
                                                  sampler="none")
