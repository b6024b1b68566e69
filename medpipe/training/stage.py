"""The ``train`` and ``train_segmenter`` stages: one deep model of ``models``, trained with one seed.

``dvc.yaml`` runs this once per model and seed (a ``matrix`` over ``classifiers``/``segmenters`` and
``seeds``), so each (model, seed) has its own cached output and changing one model's knob, or adding
a seed, trains only what changed. The output folder holds:

- ``model.pt``: the best-by-validation checkpoint (self-describing: :class:`TorchClassifier` or
  :class:`UNetSegmenter` rebuild the model from it);
- ``validation.json``: the validation metrics of the best epoch (the champion is chosen on these).

No timing goes into either file, so a rerun on the same inputs gives the same bytes and ``dvc.lock``
does not move; timings go to MLflow and the log. Per-epoch curves go to DVCLive (``--live``).

``train.processes > 1`` trains data-parallel (DistributedDataParallel): the stage command runs itself
again under ``torchrun --standalone --nproc_per_node=N`` and waits (torchrun's exit status is the
stage's; a failure on any rank stops them all). Each worker joins the process group (NCCL and GPU
``LOCAL_RANK`` on CUDA, gloo on CPU), takes its share of the cores and trains on its shard of every
epoch (:mod:`medpipe.training.loop`); rank 0 alone writes the outputs, the same files as one process
writes, and logs to MLflow. Started by torchrun directly (several nodes), the stage trains with the
``WORLD_SIZE`` torchrun gives it, whatever ``train.processes`` says.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medpipe import config
from medpipe.data import imageset
from medpipe.data.imageset import ImageSet
from medpipe.errors import UserError
from medpipe.io import atomic_dir, read_json, write_json
from medpipe.runtime import configure_threads, register_worker
from medpipe.segmentation.config import UNetSpec
from medpipe.training.config import ClassifierSpec, ModelSpec, TrainConfig
from medpipe.tracking.curves import EpochLog
from medpipe.tracking.models import log_trained_model
from medpipe.tracking.runs import start_run
from medpipe.training.loop import FitResult

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"
VALIDATION_FILE = "validation.json"
STAGE_MODULE = "stages.train"
WORKER_ENV = ("LOCAL_RANK", "WORLD_SIZE")   # set by torchrun in each worker
CLASSIFIER_LOADER = "medpipe.training.predictor"   # the modules that load the saved models (named in MLflow)
UNET_LOADER = "medpipe.segmentation.predictor"


class LaunchError(UserError, RuntimeError):
    """``train.processes > 1`` but the stage was not started as ``python -m stages.train``, or asks for more
    processes than the machine has GPUs."""


@dataclass(frozen=True)
class TrainPaths:
    model: str             # a key of params.yaml's `models`
    seed: int              # the training seed (one of `seeds`)
    train: Path            # data/processed/<train_set>.npz
    val: Path              # data/processed/val.npz
    normalization: Path    # data/processed/normalization.json
    out: Path              # models/<model>/seed<seed>/
    live: Path             # plots/train/<model>/seed<seed>/ (DVCLive)


def model_spec(params: dict, name: str) -> ModelSpec:
    """``models.<name>`` validated as a classifier or, for ``arch: unet``, a segmenter."""
    models = params.get("models") or {}
    if name not in models:
        raise config.ParamsError(f"params.yaml: models has no entry {name!r}; defined: {sorted(models)}")
    raw = models[name] or {}
    key = f"models.{name}"
    spec = config.load_section({key: raw}, key, UNetSpec if raw.get("arch") == "unet" else ClassifierSpec)
    if isinstance(spec, ClassifierSpec) and spec.weights not in ("imagenet", "none") and not Path(spec.weights).is_file():
        raise config.ParamsError(f"params.yaml: {key}.weights: {spec.weights!r} is neither 'imagenet', 'none' "
                                 "nor an existing state-dict file")
    try:
        spec.train_config(config.load_section(params, "train", TrainConfig))
    except ValueError as err:
        raise config.ParamsError(f"params.yaml: models.{name}.train: {err}") from None
    return spec


def best_summary(result: FitResult) -> dict[str, Any]:
    """What ``validation.json`` holds: the best epoch and its validation metrics (no timings)."""
    metrics = {k: (None if v is None or not np.isfinite(v) else round(float(v), 6))
               for k, v in result.best_metrics.items()}
    return {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
            "stopped_early": result.stopped_early, "validation": metrics}


def load_splits(paths: TrainPaths) -> tuple[ImageSet, ImageSet, dict]:
    train, val = ImageSet.load(paths.train), ImageSet.load(paths.val)
    if train.class_names != val.class_names:
        raise config.ParamsError(f"{paths.train} and {paths.val} have different classes: "
                                 f"{train.class_names} vs {val.class_names}")
    if not paths.normalization.is_file():
        raise FileNotFoundError(f"{paths.normalization} does not exist: run the split stage (dvc repro split)")
    return train, val, read_json(paths.normalization)


def fit_model(name: str, spec: ModelSpec, cfg: TrainConfig, splits: tuple[ImageSet, ImageSet, dict], seed: int,
              checkpoint: Path, on_epoch) -> tuple[Any, FitResult]:
    """Train a classifier or a U-Net; returns the predictor (best weights) and the fit result."""
    train, val, norm = splits
    if isinstance(spec, UNetSpec):
        from medpipe.segmentation.predictor import UNetSegmenter
        from medpipe.segmentation.train import batch_dice, input_normalization, train_unet

        config.seed_everything(seed, deterministic=cfg.deterministic)
        model, result = train_unet(train.images, train.masks, val.images, val.masks, spec, cfg, norm["mean"],
                                   norm["std"], seed, checkpoint_path=checkpoint, on_epoch=on_epoch,
                                   batch_metrics=batch_dice)
        mean, std = input_normalization(spec, norm["mean"], norm["std"])
        frozen = spec.model_copy(update={"pretrained": False})
        return UNetSegmenter(model, frozen, mean, std, cfg.precision, cfg.channels_last), result
    from medpipe.training.classify import train_classifier

    return train_classifier(name, spec, cfg, train, val, norm, checkpoint, seed, on_epoch=on_epoch)


def missing_masks(spec: ModelSpec, train: ImageSet, val: ImageSet) -> str | None:
    """Why a segmenter cannot train on this dataset (no masks, or no lesion to learn); None for classifiers."""
    return imageset.missing_masks(train, val) if isinstance(spec, UNetSpec) else None


def torchrun_worker() -> bool:
    """Whether this process is a worker started by torchrun."""
    return all(name in os.environ for name in WORKER_ENV)


def worker_command(processes: int) -> list[str]:
    """This stage command (same module, same arguments) under ``torchrun --standalone`` with ``processes`` workers."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or spec.name != STAGE_MODULE:
        raise LaunchError(f"train.processes is {processes}: the stage starts its workers by running its own command "
                          f"under torchrun, so it must run as `python -m {STAGE_MODULE} ...` (as dvc.yaml does)")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", STAGE_MODULE, *sys.argv[1:]]


def run_and_wait(command: list[str]) -> int:
    """Run ``command``; SIGTERM is passed on to it and an interrupt stops it; returns its exit status."""
    proc = subprocess.Popen(command)
    forward = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, _: proc.send_signal(signum)) if forward else None
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)


def check_gpus(cfg: TrainConfig, processes: int) -> None:
    """On CUDA, one process per GPU: no more processes than this machine's GPUs."""
    import torch

    from medpipe.training.loop import resolve_device

    if resolve_device(cfg.device).type == "cuda" and processes > torch.cuda.device_count():
        raise LaunchError(f"{processes} training processes but this machine has {torch.cuda.device_count()} GPU(s): "
                          "on CUDA each process takes one GPU; lower train.processes")


def launch_workers(cfg: TrainConfig, paths: TrainPaths) -> dict[str, Any]:
    """Train under torchrun with ``train.processes`` workers; exits with torchrun's status if it fails."""
    processes = cfg.processes
    check_gpus(cfg, processes)
    command = worker_command(processes)
    log.info("%s seed %d: training in %d processes (DistributedDataParallel): %s", paths.model, paths.seed,
             processes, " ".join(command))
    status = run_and_wait(command)
    if status != 0:
        log.error("%s seed %d: the torchrun workers failed (exit status %d)", paths.model, paths.seed, status)
        raise SystemExit(status)
    return read_json(paths.out / VALIDATION_FILE)


@contextlib.contextmanager
def process_group(cfg: TrainConfig) -> Iterator[tuple[int, int]]:
    """(rank, world size): (0, 1) in a plain process; in a torchrun worker of several, the joined process group
    (NCCL on the GPU ``LOCAL_RANK`` when ``train.device`` resolves to CUDA, else gloo), left at the end."""
    world_size = int(os.environ["WORLD_SIZE"]) if torchrun_worker() else 1
    if world_size == 1:
        yield 0, 1
        return
    import torch
    import torch.distributed as dist

    from medpipe.training.loop import resolve_device

    local_rank = int(os.environ["LOCAL_RANK"])
    if resolve_device(cfg.device).type == "cuda":
        check_gpus(cfg, local_rank + 1)
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank != 0:   # rank 0 tells the story
        logging.getLogger("medpipe").setLevel(logging.WARNING)
    try:   # torchrun stops the other ranks with SIGTERM when one fails: cli.run makes them unwind
        yield rank, world_size
    finally:
        dist.destroy_process_group()


def share_threads(setting: Any, world_size: int) -> int:
    """This process's torch threads; the ranks of one machine all register before any counts, so that they
    split the cores evenly (``configure_threads`` counts the live medpipe workers)."""
    if world_size > 1:
        import torch.distributed as dist

        register_worker()
        dist.barrier()
    return configure_threads(setting)


def run(params: dict, paths: TrainPaths) -> dict[str, Any]:
    """Train ``paths.model`` with ``paths.seed``; write ``model.pt`` and ``validation.json``; log to MLflow.

    ``train.processes > 1``: the same, data-parallel, in that many processes (see the module's notes)."""
    spec = model_spec(params, paths.model)
    cfg = spec.train_config(config.load_section(params, "train", TrainConfig))
    if cfg.processes > 1 and not torchrun_worker():
        return launch_workers(cfg, paths)
    with process_group(cfg) as (rank, world_size):
        if rank != 0:
            return train_worker(spec, cfg, paths, world_size)
        return train_and_write(params, spec, cfg, paths, world_size)


def train_worker(spec: ModelSpec, cfg: TrainConfig, paths: TrainPaths, world_size: int) -> dict[str, Any]:
    """A rank other than 0: trains its shard and writes nothing (no output folder, no MLflow run)."""
    share_threads(cfg.threads, world_size)
    splits = load_splits(paths)
    if missing_masks(spec, splits[0], splits[1]) is None:
        fit_model(paths.model, spec, cfg, splits, paths.seed, None, None)
    return {}


def write_skipped(paths: TrainPaths, reason: str) -> dict[str, Any]:
    """A model that cannot train here: ``validation.json`` says why, and the curves folder is empty (both are
    outputs of the stage in ``dvc.yaml``, which fails on a declared output that does not exist)."""
    log.warning("%s: %s", paths.model, reason)
    summary = {"status": reason}
    with atomic_dir(paths.live):
        pass
    with atomic_dir(paths.out) as out:
        write_json(out / VALIDATION_FILE, summary)
    return summary


def train_and_write(params: dict, spec: ModelSpec, cfg: TrainConfig, paths: TrainPaths,
                    world_size: int = 1) -> dict[str, Any]:
    """Train (rank 0 of ``world_size``) and write the outputs; the whole stage in a single process."""
    dataset = config.dataset_name(params)
    threads = share_threads(cfg.threads, world_size)
    splits = load_splits(paths)
    reason = missing_masks(spec, splits[0], splits[1])
    if reason:
        return write_skipped(paths, reason)
    with atomic_dir(paths.out) as out:
        run_params = {"seed": paths.seed, "dataset": dataset, "model": paths.model, "threads": threads,
                      "processes": world_size, "spec": spec.model_dump(), "train": cfg.model_dump()}
        with start_run("train", dataset, paths.model, run_params, seed=paths.seed) as _, EpochLog(paths.live) as epochs:
            start = time.perf_counter()
            log.info("training %s (%s, seed %d) on %d images, validating on %d; %d threads x %d processes",
                     paths.model, spec.arch, paths.seed, len(splits[0]), len(splits[1]), threads, world_size)
            predictor, result = fit_model(paths.model, spec, cfg, splits, paths.seed, out / MODEL_FILE, epochs.log)
            summary = {"status": "ok", **best_summary(result)}
            write_json(out / VALIDATION_FILE, summary)
            log_trained_model(out / MODEL_FILE, predictor, splits[1].images[:2], dataset, paths.model,
                              summary["validation"], timings={"train_seconds": result.train_seconds,
                                                              "images_per_second": result.images_per_second},
                              recorded_as=paths.out / MODEL_FILE,
                              loader=UNET_LOADER if isinstance(spec, UNetSpec) else CLASSIFIER_LOADER)
            log.info("%s seed %d: best epoch %d, validation %s (%.0f s)", paths.model, paths.seed, result.best_epoch,
                     summary["validation"], time.perf_counter() - start)
    return summary
