"""The ``train_cnn`` and ``train_resnet`` stages as functions: train each selected classifier, keep the
best epoch, write its checkpoint, curves and validation metrics, and log it to MLflow.

Transfer models with pretrained weights train progressively: the new head alone for
``resnet.unfreeze.head_epochs`` epochs (frozen BatchNorm statistics), then deeper block groups join
every ``step_epochs`` epochs at ``backbone_lr_factor`` times the head's learning rate.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medpipe import config, tracking
from medpipe.imageset import ImageSet
from medpipe.io import atomic_path, read_json, write_json
from medpipe.metrics import classification_metrics
from medpipe.models.factory import build_classifier
from medpipe.models.resnet import ensure_imagenet_weights, input_normalization
from medpipe.training.config import (
    CNNStageConfig, ModelSpec, ResNetModelSpec, ResNetStageConfig, TrainConfig, UnfreezeConfig,
)
from medpipe.training.data import ArrayBatches, class_weights
from medpipe.training.loop import FitResult, fit, predict_batches
from medpipe.training.predictor import TorchClassifier

log = logging.getLogger(__name__)

STAGES = {"train_cnn": ("cnn", CNNStageConfig), "train_resnet": ("resnet", ResNetStageConfig)}
METRIC_KEYS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")


@dataclass(frozen=True)
class StagePaths:
    train: Path
    val: Path
    normalization: Path
    models: Path     # models/<stage>/
    metrics: Path    # metrics/<stage>.json
    plots: Path      # plots/<stage>/


def load_stage_config(params: dict, stage: str) -> tuple[TrainConfig, CNNStageConfig | ResNetStageConfig]:
    """Validate ``train`` and the stage's own section (fails before any data is read)."""
    if stage not in STAGES:
        raise config.ParamsError(f"unknown training stage {stage!r}; known: {sorted(STAGES)}")
    section, model = STAGES[stage]
    base = config.load_section(params, "train", TrainConfig)
    stage_cfg = config.load_section(params, section, model)
    for name, spec in stage_cfg.selected().items():
        spec.train_config(base)  # per-model overrides must validate too
        if isinstance(spec, ResNetModelSpec) and spec.weights not in ("imagenet", "none") \
                and not Path(spec.weights).is_file():
            raise config.ParamsError(
                f"params.yaml: {section}.models.{name}.weights: {spec.weights!r} is neither 'imagenet', "
                "'none' nor an existing state-dict file"
            )
    return base, stage_cfg


def set_trainable_groups(groups: list[nn.Module], n_trainable: int) -> None:
    """Train the ``n_trainable`` deepest groups; freeze the rest and keep their BatchNorm statistics fixed."""
    cut = len(groups) - n_trainable
    for i, group in enumerate(groups):
        trainable = i >= cut
        for p in group.parameters():
            p.requires_grad_(trainable)
        if not trainable:
            for m in group.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def unfreezing(model: nn.Module, schedule: UnfreezeConfig) -> tuple[list[dict], Callable[[int, nn.Module], None]]:
    """Param groups (head at lr, backbone at ``backbone_lr_factor``) and the ``before_epoch`` hook."""
    groups = model.groups()
    backbone = [p for g in groups for p in g.parameters()]
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    param_groups = [{"params": head, "lr": 1.0}, {"params": backbone, "lr": schedule.backbone_lr_factor}]

    def before_epoch(epoch: int, module: nn.Module) -> None:
        n = schedule.trainable_groups(epoch, len(groups))
        set_trainable_groups(groups, n)
        log.info("epoch %d: %d of %d backbone groups trainable", epoch + 1, n, len(groups))

    return param_groups, before_epoch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((logits.argmax(1) == labels).float().mean())}


def model_spec_dict(spec: ModelSpec, num_classes: int, input_size: int) -> dict[str, Any]:
    out = {"arch": spec.arch, "num_classes": num_classes, "input_size": input_size, "dropout": spec.dropout}
    if isinstance(spec, ResNetModelSpec):
        out.update(weights=spec.weights, head=spec.head)
    return out


def train_classifier(
    name: str,
    spec: ModelSpec,
    cfg: TrainConfig,
    train: ImageSet,
    val: ImageSet,
    normalization: dict,
    checkpoint: Path,
    seed: int,
    unfreeze: UnfreezeConfig | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[TorchClassifier, FitResult]:
    """Train one classifier; the returned classifier holds the best-by-validation weights."""
    config.seed_everything(seed, deterministic=cfg.deterministic)
    num_classes = len(train.class_names)
    input_size = spec.input_size or train.image_size
    pretrained = isinstance(spec, ResNetModelSpec) and spec.pretrained
    if pretrained:
        mean, std = input_normalization(spec.arch)
    else:
        mean, std = tuple(normalization["mean"]), tuple(normalization["std"])
    arch_spec = model_spec_dict(spec, num_classes, input_size)
    model = build_classifier(arch_spec, pretrained=True)

    weights = class_weights(train.labels, num_classes, cfg.class_weights)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    plain_ce = nn.CrossEntropyLoss()
    train_batches = ArrayBatches(
        train.images, train.labels, batch_size=min(cfg.batch_size, len(train)), mean=mean, std=std,
        size=input_size, shuffle=True, drop_last=True, augment=cfg.augment,
        balanced_sampler=cfg.sampler == "weighted", seed=seed,
    )
    val_batches = ArrayBatches(val.images, val.labels, batch_size=128, mean=mean, std=std, size=input_size)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return criterion(logits.float(), labels)

    def val_fn(module: nn.Module) -> dict[str, float]:
        logits, labels = predict_batches(module, val_batches, channels_last=cfg.channels_last)
        metrics = classification_metrics(labels.numpy(), torch.softmax(logits, 1).numpy())
        metrics["loss"] = float(plain_ce(logits, labels))
        return metrics

    param_groups, before_epoch = (None, None)
    if pretrained and unfreeze is not None and hasattr(model, "groups"):
        param_groups, before_epoch = unfreezing(model, unfreeze)

    classifier = TorchClassifier(model, name, train.class_names, input_size, mean, std, arch_spec)
    result = fit(
        model, train_batches, loss_fn, val_fn, cfg, param_groups=param_groups, before_epoch=before_epoch,
        on_epoch=on_epoch, batch_metrics=accuracy, checkpoint_path=checkpoint,
        checkpoint_extra={**classifier.extra(), "seed": seed},
    )
    model.to("cpu").to(memory_format=torch.contiguous_format)
    for p in model.parameters():
        p.requires_grad_(True)
    return classifier, result


def write_curves(plots_dir: Path, name: str, history: list[dict]) -> None:
    """Per-epoch curves for DVC plots: ``curves/<model>/{loss,accuracy}.csv`` (epoch, train, val), ``lr/<model>.csv``."""
    tables = {
        plots_dir / "curves" / name / "loss.csv": ("loss", ["epoch", "train", "val"]),
        plots_dir / "curves" / name / "accuracy.csv": ("accuracy", ["epoch", "train", "val"]),
        plots_dir / "lr" / f"{name}.csv": ("lr", ["epoch", "lr"]),
    }
    for path, (key, columns) in tables.items():
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for rec in history:
                if key == "lr":
                    writer.writerow([rec["epoch"], f"{rec['lr']:.6g}"])
                else:
                    writer.writerow([rec["epoch"], f"{rec.get(f'train_{key}', float('nan')):.6g}",
                                     f"{rec.get(f'val_{key}', float('nan')):.6g}"])


def summary(result: FitResult) -> dict[str, Any]:
    out: dict[str, Any] = {k: _round(result.best_metrics.get(k)) for k in METRIC_KEYS}
    out.update(
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        train_seconds=round(result.train_seconds, 1),
        images_per_second=round(result.images_per_second, 1),
    )
    return out


def _round(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return round(float(value), 4)


def log_epoch_to_mlflow(record: dict) -> None:
    import mlflow

    mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch" and np.isfinite(v)},
                       step=int(record["epoch"]))


def log_to_mlflow(classifier: TorchClassifier, best: dict, checkpoint: Path, example: np.ndarray,
                  registered_name: str, sidecar: Path) -> None:
    """Best-epoch summary metrics and the registered pyfunc model, into the active run."""
    import mlflow

    from medpipe.training.mlflow_model import log_classifier

    mlflow.log_metrics({f"best_{k}": v for k, v in best.items() if v is not None})
    log_classifier(checkpoint, classifier, example, registered_name, sidecar)


def parse_stage_args(stage: str, description: str | None = None):
    """The command line of a training stage (mirrors its ``cmd`` in dvc.yaml)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE))
    parser.add_argument("--train", type=Path, default=Path("data/processed/train_augmented.npz"))
    parser.add_argument("--val", type=Path, default=Path("data/processed/val.npz"))
    parser.add_argument("--normalization", type=Path, default=Path("data/processed/normalization.json"))
    parser.add_argument("--models", type=Path, default=Path(f"models/{stage}"))
    parser.add_argument("--metrics", type=Path, default=Path(f"metrics/{stage}.json"))
    parser.add_argument("--plots", type=Path, default=Path(f"plots/{stage}"))
    parser.add_argument("--no-mlflow", action="store_true", help="skip MLflow logging (quick local tries)")
    args = parser.parse_args()
    paths = StagePaths(args.train, args.val, args.normalization, args.models, args.metrics, args.plots)
    return args, paths


def run_stage(params: dict, stage: str, paths: StagePaths, log_mlflow: bool = True) -> dict[str, dict]:
    """Train every model the stage's section selects; returns the metrics written to ``paths.metrics``."""
    base, stage_cfg = load_stage_config(params, stage)
    section = STAGES[stage][0]
    dataset = config.dataset_name(params)
    seed = config.global_seed(params)
    train, val = ImageSet.load(paths.train), ImageSet.load(paths.val)
    if train.class_names != val.class_names:
        raise ValueError(f"{paths.train} and {paths.val} have different classes")
    if not paths.normalization.is_file():
        raise FileNotFoundError(f"{paths.normalization} does not exist: run the split stage (dvc repro split)")
    normalization = read_json(paths.normalization)
    unfreeze = getattr(stage_cfg, "unfreeze", None)
    for spec in stage_cfg.selected().values():  # fail before any training when weights cannot be had
        if isinstance(spec, ResNetModelSpec) and spec.weights == "imagenet":
            ensure_imagenet_weights(spec.arch)

    results: dict[str, dict] = {}
    for name, spec in stage_cfg.selected().items():
        cfg = spec.train_config(base)
        checkpoint = paths.models / f"{name}.pt"
        log.info("%s: training %s (%s) on %d images, validating on %d", stage, name, spec.arch, len(train), len(val))
        run_params = {"seed": seed, "dataset": dataset, "image_size": train.image_size, "train": cfg.model_dump(),
                      section: {"model": name, **spec.model_dump(),
                                **({"unfreeze": unfreeze.model_dump()} if unfreeze else {})}}
        start = time.perf_counter()
        args = (name, spec, cfg, train, val, normalization, checkpoint, seed, unfreeze)
        if log_mlflow:
            with tracking.start_run(stage, dataset, name, run_params):
                classifier, result = train_classifier(*args, on_epoch=log_epoch_to_mlflow)
                results[name] = summary(result)
                log_to_mlflow(classifier, results[name], checkpoint, val.images[:2],
                              tracking.registered_model_name(dataset, name), paths.models / f"{name}.mlflow.json")
        else:
            classifier, result = train_classifier(*args)
            results[name] = summary(result)
        write_curves(paths.plots, name, result.history)
        log.info("%s: %s best epoch %d %s (%.0f s in all)", stage, name, result.best_epoch,
                 {k: results[name][k] for k in METRIC_KEYS}, time.perf_counter() - start)
    write_json(paths.metrics, results)
    return results
