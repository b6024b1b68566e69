"""Typed views of the ``train`` and ``models`` sections of ``params.yaml``.

``train`` holds what every torch model shares (optimiser, learning rate, schedule, early stopping,
imbalance handling, online augmentation, precision, progressive unfreezing); each entry of ``models``
holds what differs per model and may override any ``train`` key under its own ``train:``. ``train.lr``
is the one learning rate: a model scales it with its own ``lr_factor``, so ``dvc exp run -S
train.lr=1e-4`` changes every deep model at once. The segmenters' spec extends :class:`ModelSpec` in
``medpipe.segmentation.config``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from medpipe.config import Strict
from medpipe.models.registry import get_architecture


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


class TrainConfig(Strict):
    """Knobs of :func:`medpipe.training.loop.fit` (the ``train`` section)."""

    train_set: Literal["train", "train_augmented"] = "train_augmented"   # what the classifiers train on
    threads: Literal["auto"] | int = "auto"             # torch threads: auto = a share of the cores
    processes: int = Field(1, ge=1)                     # > 1: DistributedDataParallel, one process per GPU/share
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
    # the validation metric early stopping and checkpoint choice watch: a classifier's one of CLASSIFIER_MONITORS
    # (checked when its params load); the U-Net watches its Dice
    monitor: str = "balanced_accuracy"
    monitor_mode: Literal["max", "min"] = "max"
    patience: int = Field(10, ge=1)                     # early stopping: epochs without improvement
    min_delta: float = Field(0.0, ge=0)
    grad_clip: float = Field(0.0, ge=0)                 # max gradient norm; 0 = off
    # bf16 autocast | fp32 | auto: bf16 where the hardware computes it (CUDA, CPUs with AVX-512 BF16 or AMX), fp32
    # where it would be emulated (AVX2 CPUs, 11x slower there)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True
    class_weights: Literal["auto", "none"] | list[float] = "auto"   # auto = inverse class frequency
    sampler: Literal["none", "weighted"] = "none"       # weighted = WeightedRandomSampler by class
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ema_decay: float = Field(0.0, ge=0, lt=1)           # weight averaging: EMA of the weights, updated every step,
    #                                                     is what validates and is kept; 0 = off
    mixup_alpha: float = Field(0.0, ge=0)               # classifiers: mixup with lambda ~ Beta(alpha, alpha); 0 = off
    cutmix_alpha: float = Field(0.0, ge=0)              # classifiers: cutmix likewise; both > 0: one or the other
    mix_prob: float = Field(1.0, ge=0, le=1)            # share of training batches mixed (when either alpha > 0)
    augment: OnlineAugmentConfig = OnlineAugmentConfig()
    unfreeze: UnfreezeConfig = UnfreezeConfig()

    @field_validator("threads")
    @classmethod
    def _positive_threads(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError(f"threads must be 'auto' or a positive integer, got {value}")
        return value

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, value):
        if isinstance(value, list) and (not value or any(w <= 0 for w in value)):
            raise ValueError(f"class weights must be a non-empty list of positive numbers, got {value}")
        return value

    @model_validator(mode="after")
    def _mixing_pairs_a_batch(self) -> TrainConfig:
        if self.mixes and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix pair each batch with its reverse: batch_size must be even, got "
                             f"{self.batch_size}")
        return self

    @property
    def mixes(self) -> bool:
        """Whether classifier batches are mixed (mixup or cutmix)."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def updated(self, **changes) -> TrainConfig:
        """A copy with ``changes`` applied and validated again."""
        return type(self).model_validate({**self.model_dump(), **changes})


class ModelSpec(Strict):
    """What every deep model of ``models`` has: an architecture, an input size, and its own training recipe.

    ``train`` overrides keys of the shared ``train`` section for this model only (``{epochs: 12}``);
    ``lr_factor`` scales the shared ``train.lr``, so ``dvc exp run -S train.lr=1e-4`` moves every model.
    """

    arch: str
    input_size: int | None = Field(None, ge=8, le=1024)   # resize inputs to this side; None = the data's size,
    #                                  raised to the architecture's minimum (medpipe.models.default_input_size)
    lr_factor: float = Field(1.0, gt=0)
    train: dict[str, Any] = {}

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The shared recipe with this model's overrides (validated again: a bad key or value fails here)."""
        unknown = sorted(set(self.train) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"train overrides unknown key(s) {unknown}; known: {sorted(TrainConfig.model_fields)}")
        return base.updated(**{"lr": base.lr * self.lr_factor, **self.train})


def check_classifier_monitor(cfg: TrainConfig) -> TrainConfig:
    """A classifier's ``monitor`` names one of its validation metrics, watched the right way (before any training)."""
    if cfg.monitor not in CLASSIFIER_MONITORS:
        raise ValueError(f"monitor {cfg.monitor!r} is not a classifier's validation metric; one of "
                         f"{list(CLASSIFIER_MONITORS)}")
    if (cfg.monitor == "loss") != (cfg.monitor_mode == "min"):
        raise ValueError(f"monitor_mode {cfg.monitor_mode!r} with monitor {cfg.monitor!r}: the loss is watched "
                         "with 'min', every other metric with 'max'")
    return cfg


CLASSIFIER_MONITORS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "loss")  # a classifier's validation metrics


class ClassifierSpec(ModelSpec):
    """A deep classifier: a small CNN from scratch or a transfer-learning backbone with a new head."""

    def train_config(self, base: TrainConfig) -> TrainConfig:
        return check_classifier_monitor(super().train_config(base))

    weights: str = "none"                    # imagenet | none | <path to a state dict>
    head: Literal["linear", "attention"] = "linear"
    dropout: float = Field(0.5, ge=0, lt=1)

    @field_validator("arch")
    @classmethod
    def _known(cls, value: str) -> str:
        get_architecture(value)
        return value

    @model_validator(mode="after")
    def _weights_fit_the_architecture(self) -> ClassifierSpec:
        if get_architecture(self.arch).family == "cnn" and (self.weights != "none" or self.head != "linear"):
            raise ValueError(f"{self.arch} is a small CNN trained from scratch: weights must be 'none' and head "
                             f"'linear' (got weights={self.weights!r}, head={self.head!r})")
        return self

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"
