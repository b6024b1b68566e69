"""One training loop for every torch model: classifiers, U-Nets, anything with a loss.

The loop knows nothing about labels: the model, the loss and the validation metrics are arguments.
It handles the optimiser and learning-rate schedule (:mod:`medpipe.training.optim`), early stopping on a named validation metric, the best-by-validation checkpoint
(self-describing: model, optimiser, scheduler, epoch, config and whatever ``checkpoint_extra`` adds),
``channels_last`` and bf16 autocast on CPU, CUDA where a GPU exists (:mod:`medpipe.training.device`), and a
per-epoch history.

Usage (a segmenter; a classifier only swaps the loss and the metrics)::

    from medpipe.training.config import TrainConfig
    from medpipe.training.data import ArrayBatches
    from medpipe.training.device import predict_batches
    from medpipe.training.loop import fit

    cfg = TrainConfig(lr=1e-3, epochs=30, monitor="dice", monitor_mode="max")
    train = ArrayBatches(images, masks, batch_size=16, mean=mean, std=std, shuffle=True,
                         drop_last=True, augment=cfg.augment, targets_are_masks=True, seed=42)
    val = ArrayBatches(val_images, val_masks, batch_size=64, mean=mean, std=std)

    def loss_fn(logits, masks):                   # outputs and targets of one batch
        return dice_bce(logits, masks)

    def val_fn(model):                            # called in eval mode under inference_mode + autocast
        logits, masks = predict_batches(model, val)
        return {"dice": dice(logits, masks), "loss": float(loss_fn(logits, masks))}

    result = fit(model, train, loss_fn, val_fn, cfg, checkpoint_path="models/segment/unet.pt")
    result.best_metrics, result.best_epoch, result.history   # model now holds the best weights

``train_batches`` is any re-iterable of ``(inputs, targets)`` (a ``DataLoader`` works too);
``targets`` may be a tensor or a tuple of tensors and is passed to ``loss_fn`` unchanged (after moving
to the device). ``param_groups`` lets a caller give parts of the model their own learning rate (the
``lr`` of each group is a factor of ``cfg.lr``); ``before_epoch(epoch, model)`` runs after
``model.train()`` each epoch (progressive unfreezing uses it to freeze blocks and keep their
BatchNorm in eval mode); ``on_epoch(record)`` sees each epoch's record (MLflow, DVCLive, logging).

Weight averaging (``train.ema_decay`` > 0): an exponential moving average of the weights and BatchNorm
statistics (``torch.optim.swa_utils.AveragedModel``), updated after every optimizer step, is what
validation scores, the best checkpoint keeps and ``model`` holds at the end; the raw weights only train.

Data-parallel training (:mod:`medpipe.training.distributed`): when a ``torch.distributed`` process group is
initialised (a deep training stage does it under torchrun, ``train.processes > 1``), :func:`fit` wraps the
model in DistributedDataParallel (gradients averaged across ranks every step; ``train_batches`` must be this
rank's shard, e.g. ``ArrayBatches(..., rank=, world_size=)``), all-reduces the epoch's training loss and batch metrics
(sample-weighted means over all ranks), validates on rank 0 alone and broadcasts the metrics, so every
rank takes the same early-stopping, scheduler and best-epoch decisions. Only rank 0 writes the
checkpoint (of the unwrapped model: it loads like a single-process one) and sees ``on_epoch``. With
progressive unfreezing (``before_epoch``), every parameter joins DDP's gradient reducer when wrapped
(DDP never averages the gradient of a parameter frozen at that moment, even once unfrozen) and
``find_unused_parameters=True`` lets the frozen ones sit out each step; other models are wrapped with
``static_graph=True`` (the same parameters used at every step; those never used are found once).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medpipe.errors import UserError
from medpipe.training.checkpoint import save_checkpoint
from medpipe.training.config import TrainConfig
from medpipe.training.device import autocast, resolve_device, to_device
from medpipe.training.distributed import all_reduce_sums, broadcast_from_rank0, data_parallel, world
from medpipe.training.optim import build_optimizer, build_scheduler, step_epoch_scheduler

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]
ValFn = Callable[[nn.Module], Mapping[str, float]]
BatchMetricFn = Callable[[Any, Any], Mapping[str, float]]


class MonitorError(UserError, KeyError):
    """The validation metrics lack the key named by ``train.monitor``."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


@dataclass
class FitResult:
    best_epoch: int                      # 1-based epoch of the best validation score
    best_metrics: dict[str, float]       # validation metrics at that epoch
    history: list[dict[str, float]]      # one record per epoch: epoch, lr, train_*, val_*, seconds
    train_seconds: float
    images_per_second: float             # training samples per second over all epochs
    stopped_early: bool
    checkpoint_path: Path | None = None
    best_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


class EarlyStopping:
    """Tracks the best value of a metric; ``step`` returns True when the run should stop."""

    def __init__(self, mode: str = "max", patience: int = 10, min_delta: float = 0.0) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0

    def is_improvement(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def step(self, value: float, epoch: int) -> bool:
        if self.is_improvement(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


def _batch_size(targets: Any, inputs: Any) -> int:
    for value in (inputs, targets):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
            return int(value[0].shape[0])
    return 1


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    batch_metrics: BatchMetricFn | None = None,
    batch_scheduler: Any = None,
    averaged: nn.Module | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over ``batches``; returns the sample-weighted mean loss (and batch metrics) and the sample count.

    ``batch_scheduler`` (one-cycle) is stepped after every optimizer step, and ``averaged`` (the weight
    average, :func:`weight_average`) updated.
    """
    totals: dict[str, float] = {}
    seen = 0
    for inputs, targets in batches:
        inputs = to_device(inputs, device, cfg.channels_last)
        targets = to_device(targets, device)
        with autocast(device, cfg.precision):
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; lower train.lr (now {cfg.lr:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        if averaged is not None:
            averaged.update_parameters(model)
        n = _batch_size(targets, inputs)
        seen += n
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) * n
        if batch_metrics is not None:
            with torch.no_grad():
                for key, value in batch_metrics(outputs.detach(), targets).items():
                    totals[key] = totals.get(key, 0.0) + float(value) * n
    if seen == 0:
        raise ValueError("the training batches are empty (fewer images than one batch with drop_last, "
                         "per process with train.processes > 1?)")
    if world()[1] > 1:  # sums over every rank's shard: sample-weighted means of the whole epoch
        keys = list(totals)
        summed = all_reduce_sums([seen, *(totals[k] for k in keys)], device)
        seen, totals = int(round(summed[0])), dict(zip(keys, summed[1:], strict=True))
    return {k: v / seen for k, v in totals.items()}, seen


def evaluate(model: nn.Module, val_fn: ValFn, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Run ``val_fn(model)`` in eval mode under ``inference_mode`` and the training precision."""
    model.eval()
    with torch.inference_mode(), autocast(device, cfg.precision):
        metrics = dict(val_fn(model))
    return {k: (float(v) if v is not None else float("nan")) for k, v in metrics.items()}


def evaluate_on_rank0(model: nn.Module, val_fn: ValFn, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """:func:`evaluate` on rank 0 (of the unwrapped model), its metrics broadcast to every rank; an error
    there fails every rank at once."""
    rank, world_size = world()
    if world_size == 1:
        return evaluate(model, val_fn, cfg, device)
    if rank != 0:
        val = broadcast_from_rank0(None)
        if isinstance(val, str):
            raise RuntimeError(f"validation failed on rank 0: {val}")
        return val
    try:
        val = evaluate(model, val_fn, cfg, device)
    except BaseException as err:
        broadcast_from_rank0(f"{type(err).__name__}: {err}")
        raise
    return broadcast_from_rank0(val)


def checkpoint_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The recipe a checkpoint records: ``processes`` only when several trained it (as many as did), so a
    single-process checkpoint has the same bytes as before the knob existed."""
    recipe = cfg.model_dump(exclude={"processes"})
    if world_size > 1:
        recipe["processes"] = world_size
    return recipe


def place(model: nn.Module, cfg: TrainConfig) -> torch.device:
    """Move ``model`` to ``train.device`` (channels-last memory when asked); returns the device."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None and world()[1] > 1:
        device = torch.device("cuda", torch.cuda.current_device())   # the GPU the stage gave this rank
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return device


def distribute(model: nn.Module, train_batches: Iterable, device: torch.device, trainable_changes: bool) -> nn.Module:
    """``model`` as the training steps run it: itself in one process; in a process group of several, wrapped in
    DistributedDataParallel (``train_batches`` must be this rank's shard), each rank with its own random stream."""
    rank, world_size = world()
    if world_size == 1:
        return model
    shards = getattr(train_batches, "world_size", world_size)
    if shards != world_size:
        raise ValueError(f"{world_size} processes train but the training batches are split {shards} ways: "
                         "give each rank its shard (ArrayBatches(..., rank=, world_size=))")
    net = data_parallel(model, device, trainable_changes)
    torch.manual_seed((torch.initial_seed() + rank) % 2**63)   # dropout etc.: each rank its own random stream
    return net


def weight_average(model: nn.Module, cfg: TrainConfig) -> nn.Module | None:
    """The exponential moving average of ``model``'s weights and BatchNorm statistics (``train.ema_decay``),
    or None when off. Its ``module`` is a copy of ``model`` that validation sees and checkpoints keep."""
    if cfg.ema_decay == 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)


def monitored(val: dict[str, float], cfg: TrainConfig) -> float:
    """The validation score ``train.monitor`` names; a clear error when the metrics lack it."""
    if cfg.monitor not in val:
        raise MonitorError(
            f"train.monitor is {cfg.monitor!r} but the validation metrics are {sorted(val)}; "
            "set train.monitor to one of them"
        )
    return val[cfg.monitor]


def epoch_record(epoch: int, lr: float, train_stats: dict, val: dict, seconds: float, seen: int) -> dict[str, float]:
    return {
        "epoch": epoch,
        "lr": lr,
        **{f"train_{k}": v for k, v in train_stats.items()},
        **{f"val_{k}": v for k, v in val.items()},
        "seconds": seconds,
        "images_per_second": seen / seconds if seconds > 0 else float("nan"),
    }


@dataclass
class _Progress:
    """What :func:`fit` carries from epoch to epoch."""

    stopper: EarlyStopping
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    train_time: float = 0.0
    samples: int = 0
    stopped_early: bool = False

    def stop_early(self, epochs_run: int, cfg: TrainConfig) -> None:
        self.stopped_early = epochs_run < cfg.epochs
        log.info("early stopping after epoch %d: no %s improvement in %d epochs", epochs_run, cfg.monitor, cfg.patience)

    def keep_best(self, model: nn.Module, val: dict[str, float]) -> None:
        self.best_metrics = dict(val)
        self.best_state = copy.deepcopy(model.state_dict())

    def result(self, model: nn.Module, restore_best: bool, checkpoint_path: Path | None) -> FitResult:
        if not self.best_state:  # the monitored metric was NaN in every epoch: keep the last weights
            self.best_state = copy.deepcopy(model.state_dict())
            self.best_metrics = {k[4:]: v for k, v in self.history[-1].items() if k.startswith("val_")}
            self.stopper.best_epoch = len(self.history)
        if restore_best:
            model.load_state_dict(self.best_state)
        model.eval()
        return FitResult(
            best_epoch=self.stopper.best_epoch, best_metrics=self.best_metrics, history=self.history,
            train_seconds=self.train_time,
            images_per_second=self.samples / self.train_time if self.train_time > 0 else float("nan"),
            stopped_early=self.stopped_early, checkpoint_path=checkpoint_path, best_state=self.best_state,
        )


def fit(model: nn.Module, train_batches: Iterable, loss_fn: LossFn, val_fn: ValFn, cfg: TrainConfig, *,
        param_groups: Sequence[dict] | None = None, before_epoch: Callable[[int, nn.Module], None] | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None, batch_metrics: BatchMetricFn | None = None,
        checkpoint_path: str | Path | None = None, checkpoint_extra: Mapping[str, Any] | None = None,
        restore_best: bool = True) -> FitResult:
    """Train ``model`` for up to ``cfg.epochs`` epochs, keeping the best epoch by ``cfg.monitor``.

    Epochs in records are 1-based; ``before_epoch`` receives the 0-based epoch index. In a process group of
    several ranks (see the module's notes) only rank 0 writes ``checkpoint_path`` and calls ``on_epoch``."""
    device = place(model, cfg)
    rank, world_size = world()
    net = distribute(model, train_batches, device, trainable_changes=before_epoch is not None)
    optimizer = build_optimizer(param_groups if param_groups is not None else model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_batches) if isinstance(train_batches, Sized) else None)
    per_batch = isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    averaged = weight_average(model, cfg)
    kept = averaged.module if averaged is not None else model   # the weights validated and kept
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    progress = _Progress(EarlyStopping(cfg.monitor_mode, cfg.patience, cfg.min_delta))

    for epoch in range(cfg.epochs):
        net.train()
        if before_epoch is not None:
            before_epoch(epoch, model)
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        train_stats, seen = train_one_epoch(net, train_batches, loss_fn, optimizer, cfg, device, batch_metrics,
                                            scheduler if per_batch else None, averaged)
        seconds = time.perf_counter() - start
        progress.train_time += seconds
        progress.samples += seen
        val = evaluate_on_rank0(kept, val_fn, cfg, device)
        score = monitored(val, cfg)
        improved = progress.stopper.is_improvement(score)
        stop = progress.stopper.step(score, epoch + 1)
        step_epoch_scheduler(scheduler, score, per_batch)
        record = epoch_record(epoch + 1, lr, train_stats, val, seconds, seen)
        progress.history.append(record)
        log.info("epoch %d/%d lr %.2e train loss %.4f val %s %.4f%s (%.1f s)", epoch + 1, cfg.epochs, lr,
                 train_stats["loss"], cfg.monitor, score, " *" if improved else "", seconds)
        if improved:
            progress.keep_best(kept, val)
            if checkpoint_path is not None and rank == 0:
                save_checkpoint(checkpoint_path, model=kept, optimizer=optimizer, scheduler=scheduler, epoch=epoch + 1,
                                config=checkpoint_config(cfg, world_size), metrics=val, extra=checkpoint_extra)
        if on_epoch is not None and rank == 0:
            on_epoch(record)
        if stop:
            progress.stop_early(epoch + 1, cfg)
            break
    if averaged is not None:
        model.load_state_dict(kept.state_dict())   # the averaged weights are the trained model
    return progress.result(model, restore_best, checkpoint_path)


