"""One classifier (one seed) on the test split: every metric with intervals, calibration, TTA, plots."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.data.imageset import ImageSet
from medpipe.errors import UserError
from medpipe.evaluation import calibration, gradcam, plots
from medpipe.evaluation.config import EvaluateConfig
from medpipe.evaluation.scores import evaluate_with_ci
from medpipe.evaluation.tta import predict_proba_tta
from medpipe.predictors import FoldAverage, ModelFile

log = logging.getLogger(__name__)


class ClassMismatchError(UserError, ValueError):
    """A model predicts other classes than the test split holds."""


@dataclass(frozen=True)
class ClassifierScore:
    proba: np.ndarray               # (N, C) test probabilities
    details: dict[str, Any]         # every metric with its interval; calibration; TTA
    val_proba: np.ndarray | None    # (N_val, C) validation probabilities, when the validation split was given


def check_classes(model: Any, mf: ModelFile, data: ImageSet, proba: np.ndarray) -> None:
    names = tuple(str(c) for c in getattr(model, "class_names", ()))
    if names != data.class_names or proba.shape != (len(data), data.num_classes):
        raise ClassMismatchError(
            f"{mf.path}: the model predicts classes {list(names)} (probabilities {proba.shape}) but the test split "
            f"has {list(data.class_names)} ({len(data)} images): retrain it on the current dataset (dvc repro)"
        )


def temperature_scaled(val_proba: np.ndarray, val_labels: np.ndarray, proba: np.ndarray, y: np.ndarray, names,
                       ci: dict) -> dict:
    """ECE and log loss after temperature scaling fitted on the validation split (and the temperature)."""
    temperature = calibration.fit_temperature(val_proba, val_labels)
    after = evaluate_with_ci(y, calibration.apply_temperature(proba, temperature), names, **ci)
    out = {"temperature": round(temperature, 6)}
    for key in ("ece", "log_loss"):
        for suffix in ("", "_ci_low", "_ci_high"):
            if f"{key}{suffix}" in after:
                out[f"{key}_ts{suffix}"] = after[f"{key}{suffix}"]
    return out


def write_plots(out: dict[str, Path], mf: ModelFile, model: Any, test: ImageSet, proba: np.ndarray,
                cfg: EvaluateConfig, seed: int, scaled: np.ndarray | None, temperature: float | None = None) -> None:
    """DVC plot data (confusion, ROC, PR, reliability) and the PNG figures of one model: ``<model>.png`` (overview),
    ``<model>_confusion.png``, ``<model>_reliability.png`` and, for a deep classifier, its Grad-CAM grid."""
    y, names = test.labels, test.class_names
    plots.write_csv(out["confusion"] / f"{mf.name}.csv", plots.confusion_rows(y, proba.argmax(1), names))
    plots.write_csv(out["roc"] / f"{mf.name}.csv", plots.per_class(plots.roc_table(y, proba, names), "fpr", "tpr"))
    plots.write_csv(out["pr"] / f"{mf.name}.csv",
                    plots.per_class(plots.pr_table(y, proba, names), "recall", "precision"))
    plots.write_csv(out["calibration"] / f"{mf.name}.csv", plots.calibration_rows(y, proba, cfg.ece_bins, scaled))
    figures = out["figures"]
    plots.model_figure(figures / f"{mf.name}.png", mf.name, y, proba, names, cfg.ece_bins, scaled, temperature)
    plots.confusion_figure(figures / f"{mf.name}_confusion.png", mf.name, y, proba.argmax(1), names)
    plots.reliability_figure(figures / f"{mf.name}_reliability.png", mf.name, y, proba, cfg.ece_bins, scaled,
                             temperature)
    if mf.is_deep and cfg.gradcam and cfg.gradcam_per_class > 0:
        pick = gradcam.sample_per_class(y, cfg.gradcam_per_class, seed)
        explained = model.members[0] if isinstance(model, FoldAverage) else model   # a network: fold 0's
        maps, predicted = gradcam.cam_maps(explained, test.images[pick], cfg.gradcam_method)
        label = gradcam.METHOD_LABELS[cfg.gradcam_method]
        which = f"{mf.name} (fold 0's model)" if isinstance(model, FoldAverage) else mf.name
        gradcam.overlay_figure(out["gradcam"] / f"{mf.name}.png",
                               f"{which}: {label} of the predicted class, test split ({len(pick)} images)",
                               test.images[pick], maps, y[pick], predicted, names, cfg.gradcam_method)


def reference_proba(model: Any, val: ImageSet) -> np.ndarray:
    """The validation split's class probabilities (what temperature scaling and the ensemble are fitted on)."""
    return np.asarray(model.predict_proba(val.images), dtype=np.float64)


def score_classifier(model: Any, mf: ModelFile, test: ImageSet, reference: tuple[np.ndarray, np.ndarray] | None,
                     cfg: EvaluateConfig, seed: int, out: dict[str, Path] | None) -> ClassifierScore:
    """Metrics (plain, temperature-scaled calibration, TTA) of one model; its plots when ``out`` is given.

    ``reference``: (probabilities, labels) of images the model was not trained on, for temperature scaling
    and the ensemble's weights (the validation split's, or with cross-validation the out-of-fold ones), or None.
    """
    ci = {"resamples": cfg.bootstrap_resamples, "confidence": cfg.confidence, "seed": cfg.bootstrap_seed,
          "ece_bins": cfg.ece_bins}
    start = time.perf_counter()
    proba = np.asarray(model.predict_proba(test.images), dtype=np.float64)
    check_classes(model, mf, test, proba)
    log.info("%s: %d test images in %.2f s", mf.name, len(test), time.perf_counter() - start)
    y = test.labels
    details = evaluate_with_ci(y, proba, test.class_names, **ci)
    scaled, val_proba = None, None if reference is None else reference[0]
    if reference is not None and cfg.temperature_scaling:
        details.update(temperature_scaled(*reference, proba, y, test.class_names, ci))
        scaled = calibration.apply_temperature(proba, details["temperature"])
    if mf.is_deep and cfg.tta.enabled:
        details["tta"] = evaluate_with_ci(y, predict_proba_tta(model, test.images, cfg.tta, seed), test.class_names,
                                          **ci)
    if out is not None:
        write_plots(out, mf, model, test, proba, cfg, seed, scaled, details.get("temperature"))
    return ClassifierScore(proba, details, val_proba)
