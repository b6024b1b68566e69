"""The ``evaluate`` stage: score every selected model on the test split, the only stage that reads it.

Outputs (paths from ``dvc.yaml``):
- ``metrics/evaluate.json`` (DVC metrics): the headline a reviewer decides on, per classifier test
  accuracy, balanced accuracy, macro F1, macro ROC AUC and ECE, per segmenter Dice, IoU and HD95 (means
  over the training seeds), and the champion with its validation score: few numbers, no timings;
- ``reports/predictions/<model>.csv``: every test prediction of every seed (the paired verdicts and
  ``medpipe-report`` work on these, and every headline number can be recomputed from them);
- ``reports/evaluate/``: ``details.json`` (per seed and class, bootstrap intervals, TTA, calibration,
  mean and std over seeds), ``champion.json``, figures and Grad-CAM PNGs;
- ``metrics/summary.md``: the tables for people, with each model's verdict against the champion;
- ``plots/evaluate/{confusion,roc,pr,calibration}/<model>.csv``: DVC plot data (first seed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medpipe import config, tracking
from medpipe.data.imageset import ImageSet
from medpipe.evaluation import compare
from medpipe.evaluation.classify import score_classifier
from medpipe.evaluation.config import EvaluateConfig
from medpipe.evaluation.summary import markdown_summary
from medpipe.errors import UserError
from medpipe.io import atomic_dir, atomic_path, write_json
from medpipe.predictors import ModelFile, classical_models, deep_models, load_any, pixel_classifier
from medpipe.segmentation.config import SegmentConfig
from medpipe.segmentation.metrics import per_image_scores

log = logging.getLogger(__name__)
PLOT_KINDS = ("confusion", "roc", "pr", "calibration")


class NoModelError(UserError, FileNotFoundError):
    """The evaluate stage found no trained model at all."""


@dataclass(frozen=True)
class EvaluatePaths:
    models: Path         # models/ (every training stage's output folder)
    test: Path           # data/processed/test.npz
    val: Path            # data/processed/val.npz (temperature scaling)
    metrics: Path        # metrics/evaluate.json: the headline
    summary: Path        # metrics/summary.md
    details: Path        # reports/evaluate/
    predictions: Path    # reports/predictions/
    plots: Path          # plots/evaluate/


def selected_models(params: dict, models_dir: Path) -> list[ModelFile]:
    """The model files of the models and seeds params.yaml selects (stale folders are ignored)."""
    seeds = config.training_seeds(params)
    files = deep_models(models_dir, list(params.get("classifiers") or []), seeds, "classification")
    files += classical_models(models_dir)
    files += deep_models(models_dir, list(params.get("segmenters") or []), seeds, "segmentation")
    files += pixel_classifier(models_dir)
    if not files:
        raise NoModelError(f"no trained model under {models_dir}: run the training stages first (dvc repro)")
    return files


def by_name(files: list[ModelFile]) -> dict[str, list[ModelFile]]:
    groups: dict[str, list[ModelFile]] = defaultdict(list)
    for f in files:
        groups[f.name].append(f)
    return dict(groups)


def mean_std(per_seed: list[dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Mean and sample standard deviation over seeds of every numeric key they share."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    mean, std = {}, {}
    for key in keys:
        values = np.array([s.get(key) for s in per_seed if s.get(key) is not None], dtype=np.float64)
        mean[key] = round(float(values.mean()), 6) if len(values) else None
        std[key] = round(float(values.std(ddof=1)), 6) if len(values) > 1 else None
    return mean, std


def evaluate_classifier(files: list[ModelFile], test: ImageSet, val: ImageSet | None, cfg: EvaluateConfig,
                        seed: int, out: dict[str, Path]) -> tuple[compare.Predictions, dict[str, Any]]:
    """Every seed of one classifier: predictions, per-seed details, and plots/figures of the first seed."""
    probas, details = [], {}
    for k, mf in enumerate(files):
        log.info("evaluating %s (%s)", mf.name, mf.path)
        result = score_classifier(load_any(mf.path), mf, test, val, cfg, seed, out if k == 0 else None)
        probas.append(result.proba)
        details[str(mf.seed) if mf.seed is not None else "-"] = result.details
    predictions = compare.Predictions(
        kind=compare.CLASSIFIER, seeds=tuple(f.seed if f.seed is not None else seed for f in files),
        images=np.arange(len(test)), sources=tuple(str(s) for s in test.source_ids), labels=test.labels,
        class_names=test.class_names, proba=np.stack(probas),
    )
    return predictions, details


def evaluate_segmenter(files: list[ModelFile], test: ImageSet, cleanup, seed: int, grid_images: int,
                       figures: Path) -> tuple[compare.Predictions, dict[str, Any]]:
    """Every seed of one segmenter: per-image Dice, IoU and HD95 on the test images with a lesion."""
    lesion = np.flatnonzero(test.masks.reshape(len(test), -1).any(1))
    scores: dict[str, list[np.ndarray]] = defaultdict(list)
    for k, mf in enumerate(files):
        log.info("evaluating %s (%s)", mf.name, mf.path)
        masks = load_any(mf.path).predict_masks(test.images, cleanup)
        per_image = per_image_scores(test.masks, masks)
        for metric in compare.SEGMENTER_METRICS:
            scores[metric].append(np.asarray(per_image[metric], dtype=np.float64)[lesion])
        if k == 0 and grid_images:
            contour_figure(figures / f"{mf.name}.png", test, masks, per_image["dice"], grid_images, mf.name)
    predictions = compare.Predictions(
        kind=compare.SEGMENTER, seeds=tuple(f.seed if f.seed is not None else seed for f in files),
        images=lesion, sources=tuple(str(test.source_ids[i]) for i in lesion),
        scores={m: np.stack(v) for m, v in scores.items()},
    )
    return predictions, {"lesion_images": int(len(lesion)), "empty_images": int(len(test) - len(lesion))}


def contour_figure(path: Path, test: ImageSet, masks: np.ndarray, dice: np.ndarray, n: int, name: str) -> None:
    from medpipe.segmentation.viz import contour_grid, pick_examples

    index = pick_examples(test.masks, n)
    contour_grid(path, test.images[index], test.masks[index], masks[index], dice[index], f"{name}, test split")


def per_seed_headline(predictions: compare.Predictions, ece_bins: int) -> list[dict[str, float]]:
    """The headline metrics of each seed on its own."""
    single = [dataclasses.replace(predictions, seeds=(s,),
                                  proba=None if predictions.proba is None else predictions.proba[i:i + 1],
                                  scores={m: v[i:i + 1] for m, v in predictions.scores.items()})
              for i, s in enumerate(predictions.seeds)]
    return [compare.point_estimates(p, ece_bins=ece_bins) for p in single]


def rounded(values: dict[str, float]) -> dict[str, float | None]:
    return {k: None if v is None or not math.isfinite(v) else round(float(v), 4) for k, v in values.items()}


def choose_champion(files: list[ModelFile], metric: str) -> tuple[str, float, ModelFile] | None:
    """The classifier with the best mean validation ``metric`` over its seeds, and its best seed's file.

    Validation only, never the test split, so the test scores stay an unbiased estimate for the chosen
    model too. Ties go to the first name in sorted order.
    """
    scores: dict[str, list[tuple[float, ModelFile]]] = defaultdict(list)
    for mf in files:
        value = mf.validation().get(metric)
        if isinstance(value, int | float) and math.isfinite(value):
            scores[mf.name].append((float(value), mf))
        else:
            log.warning("no validation %s for %s: it cannot become champion", metric, mf.path)
    if not scores:
        return None
    means = {name: float(np.mean([v for v, _ in entries])) for name, entries in scores.items()}
    best = min(sorted(means), key=lambda name: -means[name])
    best_file = max(scores[best], key=lambda entry: entry[0])[1]
    return best, means[best], best_file


def crown(champion: tuple[str, float, ModelFile] | None, metric: str) -> dict[str, Any]:
    if champion is None:
        log.warning("no classifier has a validation %s: no champion chosen", metric)
        return {}
    name, score, mf = champion
    record = {"model": name, "seed": mf.seed, "file": str(mf.path), "selected_by": f"mean validation {metric}",
              "validation_score": round(score, 6)}
    try:
        alias = tracking.set_champion(mf.path)
        log.info("MLflow champion alias: %s", alias)
        # champion.json is a cached output: it names the alias, never the store's run id or version number,
        # which differ from store to store and from run to run
        record.update({k: alias[k] for k in ("alias_set", "registered_model", "champion_uri", "reason") if k in alias})
    except Exception as err:  # the registry is a convenience: evaluation results stand without it
        log.warning("could not set the MLflow champion alias for %s: %s", mf.path, err)
        record["alias_set"] = False
    log.info("champion: %s (mean validation %s = %.4f)", name, metric, score)
    return record


def run(params: dict, paths: EvaluatePaths) -> dict[str, Any]:
    cfg = config.load_section(params, "evaluate", EvaluateConfig)
    cleanup = config.load_section(params, "segment", SegmentConfig).cleanup
    seed = config.global_seed(params)
    config.seed_everything(seed)
    files = selected_models(params, paths.models)
    test = ImageSet.load(paths.test)
    val = ImageSet.load(paths.val) if cfg.temperature_scaling else None
    groups = by_name(files)
    predictions: dict[str, compare.Predictions] = {}
    details: dict[str, Any] = {}
    with atomic_dir(paths.details) as det, atomic_dir(paths.predictions) as pred_dir, \
            atomic_dir(paths.plots) as plot_dir:
        out = {kind: plot_dir / kind for kind in PLOT_KINDS} | {"figures": det / "figures", "gradcam": det / "gradcam"}
        for folder in out.values():
            folder.mkdir(parents=True, exist_ok=True)
        for name, group in groups.items():
            if group[0].task == "classification":
                predictions[name], by_seed = evaluate_classifier(group, test, val, cfg, seed, out)
                extra = {"seeds": by_seed}
            else:
                predictions[name], images = evaluate_segmenter(group, test, cleanup, seed, cfg.grid_images,
                                                               out["figures"])
                extra = {"test_images": images}
            per_seed = per_seed_headline(predictions[name], cfg.ece_bins)
            mean, std = mean_std(per_seed)
            details[name] = {**extra, "headline_per_seed": per_seed, "mean": mean, "std": std}
            with atomic_path(pred_dir / f"{name}.csv") as tmp:
                tmp.write_text(compare.to_csv(predictions[name]))
        champion = crown(choose_champion([f for f in files if f.task == "classification"], cfg.champion_metric),
                         cfg.champion_metric)
        verdicts = champion_verdicts(predictions, champion, cfg)
        headline = headline_metrics(predictions, champion, cfg)
        write_json(det / "details.json", details)
        write_json(det / "champion.json", champion)
    write_json(paths.metrics, headline)
    with atomic_path(paths.summary) as tmp:
        tmp.write_text(markdown_summary(headline, details, verdicts, champion, test, cfg))
    return headline


def champion_verdicts(predictions: dict[str, compare.Predictions], champion: dict[str, Any],
                      cfg: EvaluateConfig) -> dict[str, str]:
    """Each classifier's paired verdict against the champion (``within noise`` = statistically tied)."""
    if not champion or cfg.bootstrap_resamples == 0:
        return {}
    classifiers = {n: p for n, p in predictions.items() if p.kind == compare.CLASSIFIER}
    return compare.ties_with(champion["model"], classifiers, cfg.champion_metric, cfg.bootstrap_resamples,
                             cfg.bootstrap_seed, cfg.confidence)


def headline_metrics(predictions: dict[str, compare.Predictions], champion: dict[str, Any],
                     cfg: EvaluateConfig) -> dict[str, Any]:
    """What ``metrics/evaluate.json`` holds: seed-mean headline metrics per model, and the champion."""
    headline: dict[str, Any] = {"classifiers": {}, "segmenters": {}}
    for name, p in predictions.items():
        key = "classifiers" if p.kind == compare.CLASSIFIER else "segmenters"
        headline[key][name] = rounded(compare.point_estimates(p, ece_bins=cfg.ece_bins))
    if champion:
        headline["champion"] = {"model": champion["model"],
                                f"validation_{cfg.champion_metric}": round(champion["validation_score"], 4)}
    return headline
