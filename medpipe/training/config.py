"""Typed views of the ``train``, ``cnn`` and ``resnet`` sections of ``params.yaml``.

``train`` holds what every torch model shares (optimiser, learning rate, schedule, early stopping,
imbalance handling, online augmentation, precision); ``cnn`` and ``resnet`` hold what differs per
model. ``train.lr`` is the one learning rate: a model scales it with its own ``lr_factor``, so
``dvc exp run -S train.lr=1e-4`` changes every deep model at once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medpipe.config import Strict


class OnlineAugmentConfig(Strict):
    """Random transforms drawn per image but applied to whole batches of tensors (see ``training.augment``)."""

    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    rotate_degrees: float = Field(10.0, ge=0, le=180)
    scale: float = Field(0.1, ge=0, lt=1)          # zoom factor drawn in [1 - scale, 1 + scale]
    translate: float = Field(0.05, ge=0, le=0.5)   # shift as a fraction of the side
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.1, ge=0, le=1)
    padding: Literal["zeros", "border", "reflection"] = "reflection"   # fill of the area moved in from outside

    @property
    def enabled(self) -> bool:
        return any((self.hflip, self.vflip, self.rot90, self.rotate_degrees, self.scale, self.translate,
                    self.brightness, self.contrast))


class TrainConfig(Strict):
    """Knobs of :func:`medpipe.training.loop.fit` (the ``train`` section)."""

    lr: float = Field(1e-3, gt=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)            # SGD only
    batch_size: int = Field(32, ge=1, le=4096)
    epochs: int = Field(20, ge=1)
    scheduler: Literal["cosine", "onecycle", "plateau", "none"] = "cosine"
    min_lr: float = Field(1e-6, ge=0)                   # cosine floor / plateau floor
    onecycle_pct_start: float = Field(0.3, gt=0, lt=1)  # onecycle: share of the steps warming up to lr
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(3, ge=0)
    monitor: str = "balanced_accuracy"                  # a key of the validation metrics
    monitor_mode: Literal["max", "min"] = "max"
    patience: int = Field(10, ge=1)                     # early stopping: epochs without improvement
    min_delta: float = Field(0.0, ge=0)
    grad_clip: float = Field(0.0, ge=0)                 # max gradient norm; 0 = off
    precision: Literal["bf16", "fp32"] = "bf16"         # bf16 autocast (CPU with AVX-512 bf16, CUDA)
    channels_last: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True
    class_weights: Literal["auto", "none"] | list[float] = "auto"   # auto = inverse class frequency
    sampler: Literal["none", "weighted"] = "none"       # weighted = WeightedRandomSampler by class
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: OnlineAugmentConfig = OnlineAugmentConfig()

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, value):
        if isinstance(value, list) and (not value or any(w <= 0 for w in value)):
            raise ValueError(f"class weights must be a non-empty list of positive numbers, got {value}")
        return value

    def updated(self, **changes) -> TrainConfig:
        """A copy with ``changes`` applied and validated again."""
        return type(self).model_validate({**self.model_dump(), **changes})


CNN_ARCHS = ("cnn_two_conv", "cnn_four_conv", "cnn_brain_mri")
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "efficientnet_lite0")


class ModelSpec(Strict):
    """One model of a training stage; ``None`` means 'as in the ``train`` section'."""

    arch: str
    lr_factor: float = Field(1.0, gt=0)      # this model's lr = train.lr * lr_factor
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    precision: Literal["bf16", "fp32"] | None = None
    input_size: int | None = Field(None, ge=8, le=1024)   # resize inputs to this side; None = data size
    dropout: float = Field(0.5, ge=0, lt=1)

    def train_config(self, base: TrainConfig) -> TrainConfig:
        changes: dict = {"lr": base.lr * self.lr_factor}
        for key in ("epochs", "batch_size", "precision"):
            if getattr(self, key) is not None:
                changes[key] = getattr(self, key)
        return base.updated(**changes)


def known_arch(value: str, archs, kind: str) -> str:
    if value not in archs:
        raise ValueError(f"unknown {kind}architecture {value!r}; choose one of {list(archs)}")
    return value


class CNNModelSpec(ModelSpec):
    @field_validator("arch")
    @classmethod
    def _known(cls, value: str) -> str:
        return known_arch(value, CNN_ARCHS, "CNN ")


class UnfreezeConfig(Strict):
    """Progressive unfreezing of a pretrained backbone, deepest block group first."""

    head_epochs: int = Field(2, ge=0)        # epochs that train the new head only
    step_epochs: int = Field(2, ge=1)        # epochs between two unfreezing steps
    groups_per_step: int = Field(2, ge=1)    # block groups unfrozen at each step
    backbone_lr_factor: float = Field(1.0, gt=0, le=1)   # backbone lr = head lr * factor

    def trainable_groups(self, epoch: int, n_groups: int) -> int:
        """How many of the ``n_groups`` deepest backbone groups train at ``epoch`` (0-based)."""
        if epoch < self.head_epochs:
            return 0
        steps = 1 + (epoch - self.head_epochs) // self.step_epochs
        return min(n_groups, steps * self.groups_per_step)


class ResNetModelSpec(ModelSpec):
    weights: str = "none"                    # imagenet | none | <path to a state dict>
    head: Literal["linear", "attention"] = "linear"
    dropout: float = Field(0.2, ge=0, lt=1)

    @field_validator("arch")
    @classmethod
    def _known(cls, value: str) -> str:
        return known_arch(value, RESNET_ARCHS, "")

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"


class _StageConfig(Strict):
    train: list[str]
    models: dict

    @model_validator(mode="after")
    def _listed_models_exist(self):
        missing = [m for m in self.train if m not in self.models]
        if missing:
            raise ValueError(f"train lists {missing}, which are not under models (defined: {sorted(self.models)})")
        if len(set(self.train)) != len(self.train):
            raise ValueError(f"train lists a model twice: {self.train}")
        return self

    def selected(self) -> dict:
        return {name: self.models[name] for name in self.train}


class CNNStageConfig(_StageConfig):
    """The ``cnn`` section: which models ``train_cnn`` trains and how each differs."""

    train: list[str] = ["cnn_two_conv"]
    models: dict[str, CNNModelSpec] = {"cnn_two_conv": CNNModelSpec(arch="cnn_two_conv")}


class ResNetStageConfig(_StageConfig):
    """The ``resnet`` section: transfer-learning models of ``train_resnet``."""

    train: list[str] = ["efficientnet_lite0"]
    models: dict[str, ResNetModelSpec] = {
        "efficientnet_lite0": ResNetModelSpec(arch="efficientnet_lite0", weights="imagenet")
    }
    unfreeze: UnfreezeConfig = UnfreezeConfig()
