"""The ``train_pixel_classifier`` stage: fit the classical pixel classifier on the training masks.

Writes ``<out>/model.joblib`` and ``<out>/validation.json`` (validation Dice, IoU and HD95 over the
lesion images, after the clean-up the classifier asks for). The U-Net trains in the ``train_segmenter``
stage (:mod:`medpipe.segmentation.unet_stage`); ``evaluate`` scores both on the test split. A dataset without masks is not an
error: the stage writes a ``status`` saying why nothing was trained, so ``dvc repro`` goes through.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np

from medpipe import config
from medpipe.data.imageset import ImageSet, missing_masks
from medpipe.io import atomic_dir, atomic_path, write_json
from medpipe.segmentation.config import SegmentConfig
from medpipe.segmentation.metrics import per_image_scores
from medpipe.segmentation.pixel_classifier import PixelSegmenter
from medpipe.tracking.models import log_trained_model
from medpipe.tracking.runs import start_run

log = logging.getLogger(__name__)
STAGE = "train_pixel_classifier"
MODEL_NAME = "pixel_classifier"
LOADER = "medpipe.segmentation.pixel_classifier"   # the module that loads the saved model (named in MLflow)


@dataclass(frozen=True)
class PixelClassifierPaths:
    train: Path    # data/processed/<segment.train_set>
    val: Path      # data/processed/val
    out: Path      # models/pixel_classifier/


def validation_scores(masks: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    """Mean Dice, IoU and HD95 over the validation images that have a lesion."""
    scores = per_image_scores(masks, pred)
    lesion = masks.reshape(len(masks), -1).any(1)
    out = {}
    for key in ("dice", "iou", "hd95"):
        values = np.asarray(scores[key], dtype=np.float64)[lesion]
        values = values[np.isfinite(values)]
        out[key] = round(float(values.mean()), 6) if len(values) else None
    return out


def run(params: dict, paths: PixelClassifierPaths) -> dict:
    cfg = config.load_section(params, "segment", SegmentConfig)
    dataset = config.dataset_name(params)
    seed = config.global_seed(params)
    train, val = ImageSet.load(paths.train), ImageSet.load(paths.val)
    reason = missing_masks(train, val)
    with atomic_dir(paths.out) as out:
        if reason:
            log.warning("%s: %s", MODEL_NAME, reason)
            write_json(out / "validation.json", {"status": reason})
            return {"status": reason}
        config.seed_everything(seed)
        with start_run(STAGE, dataset, MODEL_NAME, {"seed": seed, "segment": cfg.model_dump()}):
            segmenter = PixelSegmenter(cfg.pixel_classifier, seed).fit(train.images, train.masks)
            with atomic_path(out / "model.joblib") as tmp:
                joblib.dump(segmenter, tmp, compress=3)
            scores = validation_scores(val.masks, segmenter.predict_masks(val.images, cfg.cleanup))
            summary = {"status": "ok", "validation": scores}
            write_json(out / "validation.json", summary)
            log_trained_model(out / "model.joblib", segmenter, val.images[:2], dataset, MODEL_NAME, scores,
                              recorded_as=paths.out / "model.joblib", loader=LOADER)
    log.info("%s: validation %s", MODEL_NAME, scores)
    return summary
