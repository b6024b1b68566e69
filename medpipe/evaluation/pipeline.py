"""The ``evaluate`` stage as a function: score every trained model on the test split.

Outputs (paths from ``dvc.yaml``):
- ``metrics/evaluate.json``: ``{model: {metric: value, metric_ci_low, metric_ci_high, ...}}`` (and
  ``<model>_tta`` for deep models with test-time augmentation), so ``dvc metrics diff`` reads model by model;
- ``metrics/summary.md``: one Markdown table comparing all models on all metrics;
- ``plots/evaluate/{confusion,roc,pr,calibration}/<model>.csv``: DVC plot data;
- ``plots/evaluate/figures/<model>.png`` and ``plots/evaluate/gradcam/<model>.png``: figures;
- ``models/evaluate/champion.json``: the best model by a validation metric (its MLflow version gets
  the alias ``champion``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medpipe import config
from medpipe.evaluation import calibration, champion, gradcam, plots
from medpipe.evaluation.config import EvaluateConfig
from medpipe.evaluation.scores import evaluate_with_ci
from medpipe.evaluation.summary import markdown_summary
from medpipe.evaluation.tta import predict_proba_tta
from medpipe.imageset import ImageSet
from medpipe.io import atomic_dir, atomic_path, write_json
from medpipe.predictors import ModelFile, discover, load_model

log = logging.getLogger(__name__)
PLOT_KINDS = ("confusion", "roc", "pr", "calibration", "figures", "gradcam")


class NoModelError(FileNotFoundError):
    """The evaluate stage found no trained model at all."""


class ClassMismatchError(ValueError):
    """A model predicts other classes than the test split holds."""


@dataclass(frozen=True)
class Outputs:
    metrics: Path
    summary: Path
    plots: Path
    champion: Path


def _check_classes(model: Any, mf: ModelFile, data: ImageSet, proba: np.ndarray) -> None:
    names = tuple(str(c) for c in getattr(model, "class_names", ()))
    if names != data.class_names or proba.shape != (len(data), data.num_classes):
        raise ClassMismatchError(
            f"{mf.path}: the model predicts classes {list(names)} (probabilities {proba.shape}) but the test split "
            f"has {list(data.class_names)} ({len(data)} images): retrain it on the current dataset (dvc repro)"
        )


def score_model(model: Any, mf: ModelFile, test: ImageSet, val: ImageSet | None, cfg: EvaluateConfig,
                seed: int, plot_dir: Path) -> dict[str, dict[str, Any]]:
    """Metrics (plain, temperature-scaled calibration, TTA) of one model, and its plot files."""
    ci = {"resamples": cfg.bootstrap_resamples, "confidence": cfg.confidence, "seed": cfg.bootstrap_seed,
          "ece_bins": cfg.ece_bins}
    start = time.perf_counter()
    proba = np.asarray(model.predict_proba(test.images), dtype=np.float64)
    seconds = time.perf_counter() - start
    _check_classes(model, mf, test, proba)
    log.info("%s: %d test images in %.2f s (%.0f images/s)", mf.name, len(test), seconds,
             len(test) / max(seconds, 1e-9))
    y = test.labels
    result = evaluate_with_ci(y, proba, test.class_names, **ci)
    out = {mf.name: result}
    scaled = None
    if val is not None:
        val_proba = np.asarray(model.predict_proba(val.images), dtype=np.float64)
        temperature = calibration.fit_temperature(val_proba, val.labels)
        scaled = calibration.apply_temperature(proba, temperature)
        after = evaluate_with_ci(y, scaled, test.class_names, **ci)
        result["temperature"] = round(temperature, 6)
        for key in ("ece", "log_loss"):
            for suffix in ("", "_ci_low", "_ci_high"):
                if f"{key}{suffix}" in after:
                    result[f"{key}_ts{suffix}"] = after[f"{key}{suffix}"]
    if mf.is_deep and cfg.tta.enabled:
        proba_tta = predict_proba_tta(model, test.images, cfg.tta, seed)
        out[f"{mf.name}_tta"] = evaluate_with_ci(y, proba_tta, test.class_names, **ci)
    names = test.class_names
    plots.write_csv(plot_dir / "confusion" / f"{mf.name}.csv", plots.confusion_rows(y, proba.argmax(1), names))
    plots.write_csv(plot_dir / "roc" / f"{mf.name}.csv", plots.roc_table(y, proba, names))
    plots.write_csv(plot_dir / "pr" / f"{mf.name}.csv", plots.pr_table(y, proba, names))
    plots.write_csv(plot_dir / "calibration" / f"{mf.name}.csv",
                    plots.calibration_rows(y, proba, cfg.ece_bins, scaled))
    plots.model_figure(plot_dir / "figures" / f"{mf.name}.png", f"{mf.name} ({mf.stage}), test split", y, proba,
                       names, cfg.ece_bins, scaled)
    if mf.is_deep and cfg.gradcam and cfg.gradcam_per_class > 0:
        pick = gradcam.sample_per_class(y, cfg.gradcam_per_class, seed)
        maps, predicted = gradcam.cam_maps(model, test.images[pick], cfg.gradcam_method)
        gradcam.overlay_figure(plot_dir / "gradcam" / f"{mf.name}.png", f"{mf.name}: {cfg.gradcam_method}",
                               test.images[pick], maps, y[pick], predicted, names)
    return out


def evaluate(params: dict, models_dir: Path, metrics_dir: Path, test_path: Path, val_path: Path,
             outputs: Outputs) -> dict[str, dict[str, Any]]:
    cfg = config.load_section(params, "evaluate", EvaluateConfig)
    seed = config.global_seed(params)
    config.seed_everything(seed)
    models = discover(models_dir)
    if not models:
        raise NoModelError(
            f"no trained model under {models_dir}/{{train_cnn,train_resnet,train_classical}} (*.pt, *.joblib): "
            "run the training stages first (dvc repro)"
        )
    test = ImageSet.load(test_path)
    val = ImageSet.load(val_path) if cfg.temperature_scaling else None
    results: dict[str, dict[str, Any]] = {}
    with atomic_dir(outputs.plots) as plot_dir:
        for kind in PLOT_KINDS:
            (plot_dir / kind).mkdir()
        for mf in models:
            log.info("evaluating %s (%s)", mf.name, mf.path)
            results.update(score_model(load_model(mf.path), mf, test, val, cfg, seed, plot_dir))
    scores = champion.validation_scores(models, metrics_dir, cfg.champion_metric)
    best = champion.choose(scores)
    record = None
    if best is None:
        log.warning("no model has a validation %s: no champion chosen", cfg.champion_metric)
    else:
        record = champion.crown(next(m for m in models if m.name == best), cfg.champion_metric, scores[best])
        log.info("champion: %s (validation %s = %.4f)", best, cfg.champion_metric, scores[best])
    write_json(outputs.champion, record or {})
    write_json(outputs.metrics, results)
    summary = markdown_summary(results, test.class_names, test.class_counts(), cfg.confidence,
                               cfg.bootstrap_resamples, record)
    with atomic_path(outputs.summary) as tmp:
        tmp.write_text(summary)
    return results
