"""What a deep training stage does around its model's fit: one model of ``models``, trained with one seed.

``train`` (the classifiers, :mod:`medpipe.training.stage`) and ``train_segmenter`` (the U-Net,
:mod:`medpipe.segmentation.unet_stage`) each run once per model and seed (a ``matrix`` over
``classifiers``/``segmenters`` and ``seeds`` in ``dvc.yaml``), so each (model, seed) has its own cached
output and changing one model's knob, or adding a seed, trains only what changed. Each stage gives a
:class:`DeepStage` (its command's module, the loader MLflow names, its fit) and this module does the rest.
The output folder holds:

- ``model.pt``: the best-by-validation checkpoint (self-describing: the stage's loader rebuilds the model);
- ``validation.json``: the validation metrics of the best epoch (the champion is chosen on these).

No timing goes into either file, so a rerun on the same inputs gives the same bytes and ``dvc.lock``
does not move; timings go to MLflow and the log. Per-epoch curves go to DVCLive (``--live``).

``train.processes > 1`` trains data-parallel (DistributedDataParallel): the stage command runs itself
again under ``torchrun --standalone --nproc_per_node=N`` and waits (torchrun's exit status is the
stage's; a failure on any rank stops them all). Each worker joins the process group and trains on its
shard of every epoch (:mod:`medpipe.training.distributed`); rank 0 alone writes the outputs, the same files
as one process writes, and logs to MLflow. Started by torchrun directly (several nodes), the stage trains
with the ``WORLD_SIZE`` torchrun gives it, whatever ``train.processes`` says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medpipe import config
from medpipe.data.imageset import ImageSet
from medpipe.io import atomic_dir, read_json, write_json
from medpipe.tracking.curves import EpochLog
from medpipe.tracking.models import log_trained_model
from medpipe.tracking.runs import start_run
from medpipe.training.config import ModelSpec, TrainConfig
from medpipe.training.distributed import (
    check_gpus,
    process_group,
    run_and_wait,
    share_threads,
    torchrun_worker,
    worker_command,
)
from medpipe.training.loop import FitResult

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"
VALIDATION_FILE = "validation.json"
SKIPPED_CURVE = "skipped.tsv"   # the curves of a model that was not trained: a header, no epoch
Splits = tuple[ImageSet, ImageSet, dict]   # training and validation sets, the split stage's normalisation


@dataclass(frozen=True)
class TrainPaths:
    model: str             # a key of params.yaml's `models`
    seed: int              # the training seed (one of `seeds`)
    train: Path            # data/processed/<train_set>
    val: Path              # data/processed/val
    normalization: Path    # data/processed/normalization.json
    out: Path              # models/<model>/seed<seed>/
    live: Path             # plots/train/<model>/seed<seed>/ (DVCLive)
    fold: int | None = None   # the cross-validation fold the data comes from (data/folds/fold<f>/), if any

    @property
    def tracked_name(self) -> str:
        """The model's name in MLflow: ``<model>`` for the hold-out model, ``<model>-fold<f>`` for a fold's."""
        return self.model if self.fold is None else f"{self.model}-fold{self.fold}"


@dataclass(frozen=True)
class DeepStage:
    """One deep training stage: the module its command runs (``python -m <module>``, which torchrun runs again),
    the module that loads its ``model.pt`` (named in MLflow), how it trains a model and, optionally, why a
    dataset has nothing for it to learn (it then writes that reason instead of a model)."""

    module: str
    loader: str
    fit: Callable[[str, ModelSpec, TrainConfig, Splits, int, Path | None, Callable | None], tuple[Any, FitResult]]
    skip_reason: Callable[[ImageSet, ImageSet], str | None] | None = None

    def why_not(self, splits: Splits) -> str | None:
        return self.skip_reason(splits[0], splits[1]) if self.skip_reason is not None else None


def model_spec(params: dict, name: str, kind: type[ModelSpec]) -> ModelSpec:
    """``models.<name>`` validated as a ``kind`` with its training recipe (``train`` and its overrides)."""
    models = params.get("models") or {}
    if name not in models:
        raise config.ParamsError(f"{config.source(params)}: models has no entry {name!r}; defined: {sorted(models)}")
    key = f"models.{name}"
    spec = config.load_section({key: models[name] or {}}, key, kind)
    try:
        spec.train_config(config.load_section(params, "train", TrainConfig))
    except ValueError as err:
        raise config.ParamsError(f"{config.source(params)}: models.{name}.train: {err}") from None
    return spec


def best_summary(result: FitResult) -> dict[str, Any]:
    """What ``validation.json`` holds: the best epoch and its validation metrics (no timings)."""
    metrics = {k: (None if v is None or not np.isfinite(v) else round(float(v), 6))
               for k, v in result.best_metrics.items()}
    return {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
            "stopped_early": result.stopped_early, "validation": metrics}


def load_splits(paths: TrainPaths) -> Splits:
    train, val = ImageSet.load(paths.train), ImageSet.load(paths.val)
    if train.class_names != val.class_names:
        raise config.ParamsError(f"{paths.train} and {paths.val} have different classes: "
                                 f"{train.class_names} vs {val.class_names}")
    if not paths.normalization.is_file():
        raise FileNotFoundError(f"{paths.normalization} does not exist: run the split stage (dvc repro split)")
    return train, val, read_json(paths.normalization)


def launch_workers(stage: DeepStage, cfg: TrainConfig, paths: TrainPaths) -> dict[str, Any]:
    """Train under torchrun with ``train.processes`` workers; exits with torchrun's status if it fails."""
    processes = cfg.processes
    check_gpus(cfg, processes)
    command = worker_command(processes, stage.module)
    log.info("%s seed %d: training in %d processes (DistributedDataParallel): %s", paths.model, paths.seed,
             processes, " ".join(command))
    status = run_and_wait(command)
    if status != 0:
        log.error("%s seed %d: the torchrun workers failed (exit status %d)", paths.model, paths.seed, status)
        raise SystemExit(status)
    return read_json(paths.out / VALIDATION_FILE)


def run(stage: DeepStage, params: dict, spec: ModelSpec, cfg: TrainConfig, paths: TrainPaths) -> dict[str, Any]:
    """Train ``paths.model`` with ``paths.seed``; write ``model.pt`` and ``validation.json``; log to MLflow.

    ``train.processes > 1``: the same, data-parallel, in that many processes (see the module's notes)."""
    if cfg.processes > 1 and not torchrun_worker():
        return launch_workers(stage, cfg, paths)
    with process_group(cfg) as (rank, world_size):
        if rank != 0:
            return train_worker(stage, spec, cfg, paths, world_size)
        return train_and_write(stage, params, spec, cfg, paths, world_size)


def train_worker(stage: DeepStage, spec: ModelSpec, cfg: TrainConfig, paths: TrainPaths,
                 world_size: int) -> dict[str, Any]:
    """A rank other than 0: trains its shard and writes nothing (no output folder, no MLflow run)."""
    share_threads(cfg.threads, world_size)
    splits = load_splits(paths)
    if stage.why_not(splits) is None:
        stage.fit(paths.model, spec, cfg, splits, paths.seed, None, None)
    return {}


def write_skipped(paths: TrainPaths, reason: str) -> dict[str, Any]:
    """A model that cannot train here (a segmenter on a dataset without masks): every output ``dvc.yaml``
    promises is still written, so ``dvc repro`` goes on to ``evaluate``: ``validation.json`` and DVCLive's
    ``metrics.json`` say why, and the curves folder holds one header-only table (git keeps no empty folder, and
    DVC would rerun the stage in a clone that lacks it)."""
    log.warning("%s seed %d: %s", paths.model, paths.seed, reason)
    summary = {"status": reason}
    with atomic_dir(paths.live) as live:
        write_json(live / "metrics.json", summary)
        (live / "plots" / "metrics").mkdir(parents=True)
        (live / "plots" / "metrics" / SKIPPED_CURVE).write_text("step\tskipped\n")
    with atomic_dir(paths.out) as out:
        write_json(out / VALIDATION_FILE, summary)
    return summary


def train_and_write(stage: DeepStage, params: dict, spec: ModelSpec, cfg: TrainConfig, paths: TrainPaths,
                    world_size: int = 1) -> dict[str, Any]:
    """Train (rank 0 of ``world_size``) and write the outputs; the whole stage in a single process."""
    dataset = config.dataset_name(params)
    threads = share_threads(cfg.threads, world_size)
    splits = load_splits(paths)
    reason = stage.why_not(splits)
    if reason:
        return write_skipped(paths, reason)
    with atomic_dir(paths.out) as out:
        run_params = {"seed": paths.seed, "dataset": dataset, "model": paths.model, "threads": threads,
                      "processes": world_size, "spec": spec.model_dump(), "train": cfg.model_dump(),
                      **({"fold": paths.fold} if paths.fold is not None else {})}
        with start_run("train", dataset, paths.tracked_name, run_params, seed=paths.seed) as _, EpochLog(paths.live) as epochs:
            start = time.perf_counter()
            log.info("training %s (%s, seed %d) on %d images, validating on %d; %d threads x %d processes",
                     paths.model, spec.arch, paths.seed, len(splits[0]), len(splits[1]), threads, world_size)
            predictor, result = stage.fit(paths.model, spec, cfg, splits, paths.seed, out / MODEL_FILE, epochs.log)
            summary = {"status": "ok", **best_summary(result)}
            write_json(out / VALIDATION_FILE, summary)
            epochs.record_best(result.best_epoch, summary["validation"])
            log_trained_model(out / MODEL_FILE, predictor, splits[1].images[:2], dataset, paths.tracked_name,
                              summary["validation"], timings={"train_seconds": result.train_seconds,
                                                              "images_per_second": result.images_per_second},
                              recorded_as=paths.out / MODEL_FILE, loader=stage.loader)
            log.info("%s seed %d: best epoch %d, validation %s (%.0f s)", paths.model, paths.seed, result.best_epoch,
                     summary["validation"], time.perf_counter() - start)
    return summary
