"""The ``segment`` stage as a function: train the U-Net and the pixel classifier, score both on the
validation and test splits, write models, metrics, plots, and log everything to MLflow.

A dataset without masks is not an error: the stage writes ``metrics/segment.json`` with a
``status`` saying why nothing was trained, and leaves a note in the models folder, so that
``dvc repro`` goes through on every dataset.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medpipe import config
from medpipe.imageset import ImageSet
from medpipe.io import atomic_path, read_json, write_json
from medpipe.segmentation.config import SegmentConfig
from medpipe.segmentation.metrics import per_image_scores, segmentation_report

log = logging.getLogger(__name__)
STAGE = "segment"


@dataclass(frozen=True)
class SegmentPaths:
    train: Path
    val: Path
    test: Path
    normalization: Path
    models: Path
    metrics: Path
    plots: Path


def missing_masks_reason(dataset: str, splits: dict[str, ImageSet]) -> str | None:
    """Why the dataset cannot be segmented, or None when every split has masks and training has a lesion."""
    without = [name for name, s in splits.items() if s.masks is None]
    if without:
        return f"skipped: dataset {dataset!r} has no segmentation masks ({', '.join(without)} split without masks)"
    if not splits["train"].masks.any():
        return f"skipped: every training mask of dataset {dataset!r} is empty: nothing to learn"
    return None


def write_skip(paths: SegmentPaths, dataset: str, reason: str) -> dict:
    log.warning("%s", reason)
    paths.models.mkdir(parents=True, exist_ok=True)
    (paths.models / "SKIPPED.txt").write_text(reason + "\n")
    paths.plots.mkdir(parents=True, exist_ok=True)
    result = {"status": reason, "dataset": dataset}
    write_json(paths.metrics, result)
    return result


def write_curves(plots_dir: Path, name: str, history: list[dict]) -> None:
    """``curves/<model>/{loss,dice}.csv`` (epoch, train, val) and ``lr/<model>.csv`` for DVC plots."""
    files = {
        plots_dir / "curves" / name / "loss.csv": ("train_loss", "val_loss"),
        plots_dir / "curves" / name / "dice.csv": ("train_dice", "val_dice"),
        plots_dir / "lr" / f"{name}.csv": ("lr",),
    }
    for path, keys in files.items():
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["epoch", *(["train", "val"] if len(keys) == 2 else ["lr"])])
            for record in history:
                writer.writerow([record["epoch"], *(f"{record.get(k, float('nan')):.6g}" for k in keys)])


def batch_dice(logits: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Mean hard Dice of a training batch at threshold 0.5 (an empty/empty pair scores 1)."""
    pred = (logits.float() > 0).flatten(1)
    true = masks.reshape(pred.shape).bool()
    inter = (pred & true).sum(1).float()
    total = (pred.sum(1) + true.sum(1)).float()
    return {"dice": float(torch.where(total > 0, 2 * inter / total.clamp(min=1), 1.0).mean())}


def score(masks: np.ndarray, pred: np.ndarray, cfg: SegmentConfig, seed: int) -> dict:
    return segmentation_report(masks, pred, cfg.bootstrap_samples, seed)


def run_segment(params: dict, paths: SegmentPaths) -> dict:
    cfg = config.load_section(params, STAGE, SegmentConfig)
    dataset = config.dataset_name(params)
    seed = config.global_seed(params)
    splits = {"train": ImageSet.load(paths.train), "val": ImageSet.load(paths.val), "test": ImageSet.load(paths.test)}
    reason = missing_masks_reason(dataset, splits)
    if reason:
        return write_skip(paths, dataset, reason)
    norm = read_json(paths.normalization)
    paths.models.mkdir(parents=True, exist_ok=True)
    (paths.models / "SKIPPED.txt").unlink(missing_ok=True)
    results: dict = {"status": "ok", "dataset": dataset, "train_images": len(splits["train"])}
    for method in cfg.methods:
        config.seed_everything(seed)
        start = time.perf_counter()
        segmenter, model_file, extra = _train(method, cfg, splits, norm, seed, paths)
        train_seconds = time.perf_counter() - start
        method_result: dict = {"train_seconds": round(train_seconds, 1), **extra}
        predictions = {}
        for split in ("val", "test"):
            data = splits[split]
            start = time.perf_counter()
            prob = segmenter.predict_proba(data.images)
            pred = _to_masks(prob, method, cfg)
            seconds = time.perf_counter() - start
            predictions[split] = pred
            method_result[split] = score(data.masks, pred, cfg, seed)
            method_result[split]["images_per_second"] = round(len(data) / seconds, 1)
        results[method] = method_result
        _grid(paths.plots / f"{method}_test.png", splits["test"], predictions["test"], cfg, method)
        _log_mlflow(method, dataset, params, method_result, model_file, segmenter, splits["val"], paths)
        log.info("%s: val Dice %.3f, test Dice %.3f (mean over lesion images), %.0f s", method,
                 method_result["val"]["dice_mean"] or float("nan"), method_result["test"]["dice_mean"] or float("nan"),
                 train_seconds)
    write_json(paths.metrics, results)
    return results


def _to_masks(prob: np.ndarray, method: str, cfg: SegmentConfig) -> np.ndarray:
    from medpipe.segmentation.postprocess import postprocess

    if method == "unet":
        threshold, post = 0.5, cfg.unet.postprocess
    else:
        threshold, post = cfg.pixel_classifier.threshold, cfg.pixel_classifier.postprocess
    masks = (prob >= threshold).astype(np.uint8)
    if post:
        pp = cfg.postprocess
        masks = np.stack([postprocess(m, pp.min_area, pp.keep_components, pp.fill_holes) for m in masks])
    return masks


def _train(method: str, cfg: SegmentConfig, splits: dict[str, ImageSet], norm: dict, seed: int,
           paths: SegmentPaths):
    train, val = splits["train"], splits["val"]
    if method == "unet":
        from medpipe.segmentation.predictor import UNetSegmenter
        from medpipe.segmentation.train import input_normalization, train_unet

        model_file = paths.models / "unet.pt"
        model, result = train_unet(train.images, train.masks, val.images, val.masks, cfg.unet, norm["mean"],
                                   norm["std"], seed, checkpoint_path=model_file, batch_metrics=batch_dice)
        write_curves(paths.plots, "unet", result.history)
        mean, std = input_normalization(cfg.unet, norm["mean"], norm["std"])
        segmenter = UNetSegmenter(model, cfg.unet.model_copy(update={"pretrained": False}), mean, std)
        extra = {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
                 "stopped_early": result.stopped_early,
                 "train_images_per_second": round(result.images_per_second, 1),
                 "parameters": sum(p.numel() for p in model.parameters())}
        return segmenter, model_file, extra
    if method == "pixel_classifier":
        import joblib

        from medpipe.segmentation.pixel_classifier import PixelSegmenter

        segmenter = PixelSegmenter(cfg.pixel_classifier, seed).fit(train.images, train.masks)
        model_file = paths.models / "pixel_classifier.joblib"
        with atomic_path(model_file) as tmp:
            joblib.dump(segmenter, tmp, compress=3)
        return segmenter, model_file, {"training_pixels": int(cfg.pixel_classifier.pixels_per_image * len(train))}
    raise ValueError(f"unknown segmentation method {method!r}")


def _grid(path: Path, data: ImageSet, pred: np.ndarray, cfg: SegmentConfig, method: str) -> None:
    from medpipe.segmentation.viz import contour_grid, pick_examples

    if cfg.grid_images == 0:
        return
    index = pick_examples(data.masks, cfg.grid_images)
    dice = per_image_scores(data.masks[index], pred[index])["dice"]
    contour_grid(path, data.images[index], data.masks[index], pred[index], dice, f"{method}, test split")


def _log_mlflow(method: str, dataset: str, params: dict, result: dict, model_file: Path, segmenter,
                val: ImageSet, paths: SegmentPaths) -> None:
    import mlflow

    from medpipe.segmentation.mlflow_model import log_segmenter
    from medpipe.tracking import flatten, registered_model_name, start_run

    logged = {"seed": params.get("seed"), "dataset": dataset, "segment": params.get(STAGE, {})}
    with start_run(STAGE, dataset, method, logged):
        numbers = {k: v for k, v in flatten(result).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in numbers.items()})
        png = paths.plots / f"{method}_test.png"
        if png.is_file():
            mlflow.log_artifact(str(png), artifact_path="plots")
        log_segmenter(model_file, segmenter, val.images[:2], registered_model_name(dataset, method),
                      paths.models / f"{method}.mlflow.json")
