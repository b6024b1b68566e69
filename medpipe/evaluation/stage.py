"""The ``evaluate`` stage: score every selected model on the test split, the only stage that reads it.

Outputs (paths from ``dvc.yaml``):
- ``metrics/evaluate.json`` (DVC metrics): the headline a reviewer decides on, per classifier test
  accuracy, balanced accuracy, macro F1, macro ROC AUC and ECE, per segmenter Dice, IoU and HD95 (means
  over the training seeds), and the champion with its validation score: few numbers, no timings;
- ``reports/predictions/<model>.csv``: every test prediction of every seed (the paired verdicts and
  ``medpipe-report`` work on these, and every headline number can be recomputed from them);
- ``reports/evaluate/``: ``details.json`` (per seed and class, bootstrap intervals, TTA, calibration,
  mean and std over seeds), ``champion.json``, ``ensemble.json`` (the soft vote's member files and
  weights, a model file for ``medpipe-predict``), figures and Grad-CAM PNGs;
- ``metrics/summary.md``: the tables for people, with each model's verdict against the champion;
- ``plots/evaluate/{confusion,roc,pr,calibration}/<model>.csv``: DVC plot data (first seed).

With cross-validation (``cv.folds``; :mod:`medpipe.evaluation.crossval`) each deep and classical model is the
average of its fold models on the test split, every train + val image is also predicted out-of-fold
(``reports/predictions/out_of_fold/<model>.csv``, an ``out_of_fold`` headline and summary table), temperature
scaling and the ensemble are fitted on those predictions, and the champion is chosen on them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medpipe import config
from medpipe.config import CVConfig
from medpipe.data.imageset import ImageSet, images_with_lesion
from medpipe.data.registry import get_spec
from medpipe.errors import UserError
from medpipe.evaluation import compare, crossval, curves, ensemble
from medpipe.evaluation.classify import reference_proba, score_classifier
from medpipe.evaluation.crossval import Folds
from medpipe.evaluation.config import EvaluateConfig
from medpipe.evaluation.scores import evaluate_with_ci
from medpipe.evaluation.summary import markdown_summary
from medpipe.evaluation.tta import predict_proba_tta
from medpipe.io import atomic_dir, atomic_path, write_json
from medpipe.predictors import ModelFile, classical_models, deep_models, not_trained, pixel_classifier
from medpipe.segmentation.config import SegmentConfig
from medpipe.segmentation.metrics import per_image_scores
from medpipe.segmentation.postprocess import to_masks
from medpipe.segmentation.viz import contour_grid, pick_examples

log = logging.getLogger(__name__)
PLOT_KINDS = ("confusion", "roc", "pr", "calibration")


class NoModelError(UserError, FileNotFoundError):
    """The evaluate stage found no trained model at all."""


@dataclass(frozen=True)
class EvaluatePaths:
    models: Path         # models/ (every training stage's output folder)
    test: Path           # data/processed/test
    val: Path            # data/processed/val (temperature scaling)
    metrics: Path        # metrics/evaluate.json: the headline
    summary: Path        # metrics/summary.md
    details: Path        # reports/evaluate/
    predictions: Path    # reports/predictions/
    plots: Path          # plots/evaluate/
    curves: Path         # plots/train/: the training stages' DVCLive curves (drawn side by side)
    folds: Path          # data/folds/: each cross-validation fold's held-out images (read when cv.folds is set)


def selected_models(params: dict, models_dir: Path, folds: list[int] = ()) -> list[ModelFile]:
    """The model files of the models and seeds params.yaml selects (stale folders are ignored); with ``folds``
    (cross-validation) each deep and classical classifier's and each deep segmenter's fold models."""
    seeds = config.training_seeds(params)
    if ensemble.NAME in (params.get("classifiers") or []):
        raise config.ParamsError(f"classifiers: {ensemble.NAME!r} is the evaluate stage's soft vote of all "
                                 f"classifiers; give the model in `models` another name")
    files = deep_models(models_dir, list(params.get("classifiers") or []), seeds, "classification", folds)
    files += classical_models(models_dir, folds)
    files += deep_models(models_dir, list(params.get("segmenters") or []), seeds, "segmentation", folds)
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


@dataclass(frozen=True)
class Member:
    """One classifier's files and probabilities per training seed (key None: a classical model, trained once)."""

    files: dict[int | None, ModelFile]
    val: dict[int | None, np.ndarray]
    test: dict[int | None, np.ndarray]

    def at(self, seed: int | None) -> int | None | bool:
        """The key that serves training ``seed`` (its own, or None for a model trained once); False if none."""
        return seed if seed in self.test else None if None in self.test else False


VALIDATION_DIR = "validation"   # reports/predictions/validation/<model>.csv: hold-out validation predictions


def test_predictions(test: ImageSet, seeds: list[int], probas: list[np.ndarray]) -> compare.Predictions:
    """A classifier's predictions on ``test`` (the test split, or the validation split), one (N, C) probability
    array per training seed."""
    return compare.Predictions(
        kind=compare.CLASSIFIER, seeds=tuple(seeds), images=np.arange(len(test)),
        sources=tuple(str(s) for s in test.source_ids), labels=test.labels, class_names=test.class_names,
        proba=np.stack(probas),
    )


@dataclass(frozen=True)
class Reference:
    """The images a model did not train on that fit its temperature and the ensemble's weights: the validation
    split, or with cross-validation every train + val image predicted out-of-fold (``folds``)."""

    images: ImageSet | None      # the validation split, or the folds' pool; None: no reference needed
    folds: Folds | None = None

    def proba(self, model: Any, mf: ModelFile) -> tuple[np.ndarray, np.ndarray] | None:
        if self.folds is not None:
            return crossval.classifier_proba(model, mf, self.folds), self.folds.pool.labels
        return None if self.images is None else (reference_proba(model, self.images), self.images.labels)


def evaluate_classifier(files: list[ModelFile], test: ImageSet, reference: Reference, cfg: EvaluateConfig,
                        seed: int, out: dict[str, Path]
                        ) -> tuple[compare.Predictions, dict[str, Any], Member, compare.Predictions | None]:
    """Every seed of one classifier: test predictions, per-seed details, plots/figures of the first seed, and
    with cross-validation the out-of-fold predictions."""
    scored = []
    for k, mf in enumerate(files):
        log.info("evaluating %s (%s)", mf.name, mf.path)
        model = mf.load()
        scored.append(score_classifier(model, mf, test, reference.proba(model, mf), cfg, seed,
                                       out if k == 0 else None))
    seeds = [f.seed if f.seed is not None else seed for f in files]
    predictions = test_predictions(test, seeds, [r.proba for r in scored])
    details = {str(mf.seed) if mf.seed is not None else "-": r.details for mf, r in zip(files, scored, strict=True)}
    member = Member({mf.seed: mf for mf in files}, {mf.seed: r.val_proba for mf, r in zip(files, scored, strict=True)},
                    {mf.seed: r.proba for mf, r in zip(files, scored, strict=True)})
    oof = None if reference.folds is None else \
        crossval.classifier_predictions(reference.folds.pool, seeds, [r.val_proba for r in scored])
    return predictions, details, member, oof


@dataclass(frozen=True)
class Vote:
    """The ensemble of one training seed: its soft vote and the member files it weighs."""

    seed: int
    vote: ensemble.SoftVote
    files: dict[str, ModelFile]

    def record(self, selected_on: str, served: Callable[[ModelFile], Path]) -> dict[str, Any]:
        """What ``ensemble.json`` holds: a model file for ``medpipe-predict`` (members of positive weight, each
        member's file as ``served`` names it); ``selected_on``: e.g. ``validation balanced_accuracy``."""
        return {"model": ensemble.NAME, "seed": self.seed, "selected_on": selected_on,
                "validation_cross_fitted": round(self.vote.validation_score, 6),
                "validation_in_sample": round(self.vote.validation_in_sample, 6),
                "temperature": self.vote.temperature,
                "members": [{"model": name, "file": str(served(self.files[name])), "weight": weight}
                            for name, weight in self.vote.weights.items() if weight > 0]}


def evaluate_ensemble(members: dict[str, Member], val: ImageSet, test: ImageSet, cfg: EvaluateConfig,
                      seed: int) -> tuple[compare.Predictions, dict[str, Any], list[Vote]]:
    """The soft vote of every classifier, once per training seed, weights chosen on the reference images ``val``
    (the validation split, or with cross-validation the pool of out-of-fold predictions)."""
    seeds = sorted({s for m in members.values() for s in m.test if s is not None}) or [None]
    probas, votes, details = [], [], {}
    for s in seeds:
        keys = {name: m.at(s) for name, m in members.items() if m.at(s) is not False}
        vote = ensemble.soft_vote({n: members[n].val[k] for n, k in keys.items()}, val.labels, cfg.champion_metric,
                                  cfg.ensemble.rounds, cfg.ensemble.folds, seed, cfg.ensemble.calibrate)
        probas.append(vote.predict({n: members[n].test[k] for n, k in keys.items()}))
        votes.append(Vote(s if s is not None else seed, vote, {n: members[n].files[k] for n, k in keys.items()}))
        details[str(votes[-1].seed)] = {
            **evaluate_with_ci(test.labels, probas[-1], test.class_names, resamples=cfg.bootstrap_resamples,
                               confidence=cfg.confidence, seed=cfg.bootstrap_seed, ece_bins=cfg.ece_bins),
            "weights": vote.weights, "vote_temperature": vote.temperature,
            f"validation_{cfg.champion_metric}_cross_fitted": vote.validation_score,
            f"validation_{cfg.champion_metric}_in_sample": vote.validation_in_sample,
        }
    return test_predictions(test, [v.seed for v in votes], probas), details, votes


def append_lesion_scores(into: dict[str, list[np.ndarray]], per_image: dict[str, np.ndarray],
                         lesion: np.ndarray) -> None:
    """Append one seed's per-image segmenter metrics, on the ``lesion`` images only, to ``into``."""
    for metric in compare.SEGMENTER_METRICS:
        into[metric].append(np.asarray(per_image[metric], dtype=np.float64)[lesion])


def evaluate_segmenter(files: list[ModelFile], test: ImageSet, cleanup, seed: int, cfg: EvaluateConfig,
                       figures: Path, folds: Folds | None = None
                       ) -> tuple[compare.Predictions, dict[str, Any], compare.Predictions | None]:
    """Every seed of one segmenter: per-image Dice, IoU and HD95 on the test images with a lesion.

    Deep segmenters are also scored with test-time augmentation (``evaluate.tta``: the probability maps of the
    views, turned back, averaged, then thresholded and cleaned up like a plain prediction): the ``tta`` entry,
    mean and std over seeds as for the plain scores. With ``folds`` (cross-validation; fold models only), the
    out-of-fold per-image scores of every train + val image with a lesion as well.
    """
    lesion = images_with_lesion(test.masks)
    scores: dict[str, list[np.ndarray]] = defaultdict(list)
    tta_scores: dict[str, list[np.ndarray]] = defaultdict(list)
    oof_scores = []
    for k, mf in enumerate(files):
        log.info("evaluating %s (%s)", mf.name, mf.path)
        model = mf.load()
        if folds is not None and mf.folds:
            oof_scores.append(crossval.segmenter_scores(model, mf, folds, cleanup))
        masks = model.predict_masks(test.images, cleanup)
        per_image = per_image_scores(test.masks, masks)
        append_lesion_scores(scores, per_image, lesion)
        if mf.is_deep and cfg.tta.enabled:
            proba = predict_proba_tta(model, test.images, cfg.tta, seed, per_pixel=True)
            tta_masks = to_masks(proba, model.threshold, model.postprocess, cleanup)
            append_lesion_scores(tta_scores, per_image_scores(test.masks, tta_masks), lesion)
        if k == 0 and cfg.grid_images:
            contour_figure(figures / f"{mf.name}.png", test, masks, per_image["dice"], cfg.grid_images, mf.name)
    seeds = [f.seed if f.seed is not None else seed for f in files]
    predictions = compare.Predictions(
        kind=compare.SEGMENTER, seeds=tuple(seeds),
        images=lesion, sources=tuple(str(test.source_ids[i]) for i in lesion),
        scores={m: np.stack(v) for m, v in scores.items()},
    )
    info: dict[str, Any] = {"test_images": {"lesion_images": len(lesion), "empty_images": len(test) - len(lesion)}}
    if tta_scores:
        per_seed = per_seed_headline(dataclasses.replace(
            predictions, scores={m: np.stack(v) for m, v in tta_scores.items()}), cfg.ece_bins)
        mean, std = mean_std(per_seed)
        info["tta"] = {"headline_per_seed": per_seed, "mean": mean, "std": std}
    oof = crossval.segmenter_predictions(folds.pool, seeds, oof_scores) if oof_scores else None
    return predictions, info, oof


def contour_figure(path: Path, test: ImageSet, masks: np.ndarray, dice: np.ndarray, n: int, name: str) -> None:
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


Candidate = ModelFile | Vote   # what can become champion: one trained model, or the ensemble of one seed


def validation_candidates(files: list[ModelFile], metric: str) -> dict[str, list[tuple[float, Candidate]]]:
    """{model: [(validation ``metric`` of one seed, its file), ...]} from the training stages' validation.json."""
    scores: dict[str, list[tuple[float, Candidate]]] = defaultdict(list)
    for mf in files:
        value = mf.validation().get(metric)
        if isinstance(value, int | float) and math.isfinite(value):
            scores[mf.name].append((float(value), mf))
        else:
            log.warning("no validation %s for %s: it cannot become champion", metric, mf.path)
    return dict(scores)


def choose_champion(candidates: dict[str, list[tuple[float, Candidate]]]) -> tuple[str, float, Candidate] | None:
    """The model with the best mean validation score over its seeds, and its best seed.

    Validation only, never the test split, so the test scores stay an unbiased estimate for the chosen
    model too (the ensemble competes with its cross-fitted score). Ties go to the first name in sorted order.
    """
    if not candidates:
        return None
    means = {name: float(np.mean([v for v, _ in entries])) for name, entries in candidates.items()}
    best = min(sorted(means), key=lambda name: -means[name])
    return best, means[best], max(candidates[best], key=lambda entry: entry[0])[1]


def prefer_ensemble(champion: tuple[str, float, Candidate] | None,
                    candidates: dict[str, list[tuple[float, Candidate]]],
                    reference: dict[str, compare.Predictions], cfg: EvaluateConfig
                    ) -> tuple[tuple[str, float, Candidate] | None, dict[str, Any]]:
    """The ensemble instead of the best model unless that model beats it on the reference images (validation, its
    cross-fitted vote; or out-of-fold) by a paired bootstrap interval of the difference that excludes 0; the
    comparison, for champion.json. On a few dozen validation images a best mean is mostly noise (BreastMNIST and
    RetinaMNIST regrets: docs/experiments.md)."""
    if champion is None or ensemble.NAME not in candidates or champion[0] == ensemble.NAME \
            or cfg.bootstrap_resamples == 0 or champion[0] not in reference or ensemble.NAME not in reference:
        return champion, {}
    metric = cfg.champion_metric
    paired = compare.compare(reference[ensemble.NAME], reference[champion[0]], [metric], cfg.bootstrap_resamples,
                             cfg.bootstrap_seed, cfg.confidence)[metric]
    record = {"best_mean": champion[0], "its_difference": round(paired.difference, 6),
              "ci_low": round(paired.ci_low, 6), "ci_high": round(paired.ci_high, 6), "verdict": paired.verdict}
    if paired.verdict == compare.BETTER:
        return champion, record
    votes = candidates[ensemble.NAME]
    return (ensemble.NAME, float(np.mean([v for v, _ in votes])), max(votes, key=lambda entry: entry[0])[1]), record


def out_of_fold_candidates(group: list[ModelFile], oof: compare.Predictions, metric: str,
                           ece_bins: int) -> list[tuple[float, Candidate]]:
    """[(out-of-fold ``metric`` of one seed, its files), ...]: what the champion is chosen on with cross-validation."""
    return [(float(scores[metric]), mf) for scores, mf in zip(per_seed_headline(oof, ece_bins), group, strict=True)
            if math.isfinite(scores[metric])]


def crown(champion: tuple[str, float, Candidate] | None, metric: str, ensemble_file: Path,
          served: Callable[[ModelFile], Path], basis: str, preferred: dict[str, Any]) -> dict[str, Any]:
    """champion.json: the chosen model, the file that serves it, the score (``basis``: validation or out-of-fold)
    that chose it, and the paired comparison of the ensemble with the best model (``preferred``) when one was made."""
    if champion is None:
        log.warning("no classifier has a %s %s: no champion chosen", basis, metric)
        return {}
    name, score, chosen = champion
    log.info("champion: %s (mean %s %s = %.4f)", name, basis, metric, score)
    extra = {"ensemble_vs_best_mean": preferred} if preferred else {}
    if isinstance(chosen, Vote):
        return {"model": name, "seed": chosen.seed, "file": str(ensemble_file),
                "selected_by": f"mean cross-fitted {basis} {metric}", "validation_score": round(score, 6), **extra}
    # nothing from MLflow goes into this cached output: `medpipe-promote` moves the alias, explicitly
    return {"model": name, "seed": chosen.seed, "file": str(served(chosen)), "selected_by": f"mean {basis} {metric}",
            "validation_score": round(score, 6), **extra}


def fold_record_name(mf: ModelFile) -> str:
    """``folds/<model>-seed<k>.json`` (``folds/<model>.json`` for a classical model): a fold-averaged model."""
    return f"folds/{mf.name}.json" if mf.seed is None else f"folds/{mf.name}-seed{mf.seed}.json"


def out_of_fold_details(p: compare.Predictions, cfg: EvaluateConfig) -> dict[str, Any]:
    """Out-of-fold metrics per seed, and their seed mean with its BCa interval over the pool's images."""
    summary = compare.intervals(p, resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed,
                                confidence=cfg.confidence, ece_bins=cfg.ece_bins) if cfg.bootstrap_resamples \
        else rounded(compare.point_estimates(p, ece_bins=cfg.ece_bins))
    return {"images": len(p.images), "headline_per_seed": per_seed_headline(p, cfg.ece_bins), "seed_mean": summary}


def champion_metric(cfg: EvaluateConfig, params: dict) -> str:
    """``evaluate.champion_metric``, with ``auto`` read as the dataset's ``benchmark_metric`` (datasets.yaml), else
    balanced accuracy (fair to every class when the classes are imbalanced and no benchmark says otherwise)."""
    if cfg.champion_metric != "auto":
        return cfg.champion_metric
    return get_spec(config.dataset_name(params)).benchmark_metric or "balanced_accuracy"


def run(params: dict, paths: EvaluatePaths) -> dict[str, Any]:
    cfg = config.load_section(params, "evaluate", EvaluateConfig)
    cfg = cfg.model_copy(update={"champion_metric": champion_metric(cfg, params)})
    cleanup = config.load_section(params, "segment", SegmentConfig).cleanup
    cv = config.load_section(params, "cv", CVConfig)
    seed = config.global_seed(params)
    config.seed_everything(seed)
    files = selected_models(params, paths.models, cv.folds)
    untrained = not_trained(paths.models, [*(params.get("classifiers") or []), *(params.get("segmenters") or [])],
                            config.training_seeds(params), cv.folds)
    test = ImageSet.load(paths.test)
    folds = crossval.load_folds(paths.folds, cv) if cv.k else None
    if folds is not None:
        reference, basis = Reference(folds.pool, folds), "out-of-fold"
    else:
        needed = cfg.temperature_scaling or cfg.ensemble.enabled
        reference, basis = Reference(ImageSet.load(paths.val) if needed else None), "validation"

    def served(mf: ModelFile) -> Path:
        """The file that serves a model: its own, or with folds the record of their average."""
        return paths.details / fold_record_name(mf) if mf.folds else mf.path

    predictions: dict[str, compare.Predictions] = {}
    oof: dict[str, compare.Predictions] = {}
    validation: dict[str, compare.Predictions] = {}   # hold-out: each classifier's on the validation split
    details: dict[str, Any] = {}
    members: dict[str, Member] = {}
    candidates: dict[str, list[tuple[float, Candidate]]] = {}
    with atomic_dir(paths.details) as det, atomic_dir(paths.predictions) as pred_dir, \
            atomic_dir(paths.plots) as plot_dir:
        out = {kind: plot_dir / kind for kind in PLOT_KINDS} | {"figures": det / "figures", "gradcam": det / "gradcam"}
        for folder in out.values():
            folder.mkdir(parents=True, exist_ok=True)
        for name, group in by_name(files).items():
            if group[0].task == "classification":
                predictions[name], by_seed, members[name], oof_pred = evaluate_classifier(group, test, reference,
                                                                                          cfg, seed, out)
                details[name] = {"seeds": by_seed}
                if folds is None and reference.images is not None:
                    validation[name] = test_predictions(reference.images, list(predictions[name].seeds),
                                                        list(members[name].val.values()))
                if oof_pred is not None:
                    candidates[name] = out_of_fold_candidates(group, oof_pred, cfg.champion_metric, cfg.ece_bins)
            else:
                predictions[name], details[name], oof_pred = evaluate_segmenter(group, test, cleanup, seed, cfg,
                                                                                out["figures"], folds)
            if oof_pred is not None:
                oof[name] = oof_pred
        if folds is None:
            candidates = validation_candidates([f for f in files if f.task == "classification"], cfg.champion_metric)
        if cfg.ensemble.enabled and reference.images is not None and len(members) > 1:
            predictions[ensemble.NAME], by_seed, votes = evaluate_ensemble(members, reference.images, test, cfg, seed)
            details[ensemble.NAME] = {"seeds": by_seed}
            candidates[ensemble.NAME] = [(v.vote.validation_score, v) for v in votes]
            if folds is not None:   # the cross-fitted vote: each image voted by weights chosen without it
                oof[ensemble.NAME] = crossval.classifier_predictions(folds.pool, [v.seed for v in votes],
                                                                     [v.vote.cross_fitted for v in votes])
            else:
                validation[ensemble.NAME] = test_predictions(reference.images, [v.seed for v in votes],
                                                             [v.vote.cross_fitted for v in votes])
            best_vote = max(votes, key=lambda v: v.vote.validation_score)
            write_json(det / ensemble.FILE, best_vote.record(f"{basis} {cfg.champion_metric}", served))
        for name, p in predictions.items():
            per_seed = per_seed_headline(p, cfg.ece_bins)
            mean, std = mean_std(per_seed)
            details[name].update({"headline_per_seed": per_seed, "mean": mean, "std": std})
            with atomic_path(pred_dir / f"{name}.csv") as tmp:
                tmp.write_text(compare.to_csv(p))
        for name, p in validation.items():
            (pred_dir / VALIDATION_DIR).mkdir(exist_ok=True)
            with atomic_path(pred_dir / VALIDATION_DIR / f"{name}.csv") as tmp:
                tmp.write_text(compare.to_csv(p))
        for name, p in oof.items():
            details[name]["out_of_fold"] = out_of_fold_details(p, cfg)
            (pred_dir / compare.OUT_OF_FOLD_DIR).mkdir(exist_ok=True)
            with atomic_path(pred_dir / compare.OUT_OF_FOLD_DIR / f"{name}.csv") as tmp:
                tmp.write_text(compare.to_csv(p))
        if untrained:
            write_json(pred_dir / compare.NOT_TRAINED_FILE, untrained)
        for mf in files:
            if mf.folds:
                (det / fold_record_name(mf)).parent.mkdir(exist_ok=True)
                write_json(det / fold_record_name(mf), crossval.fold_record(mf))
        champion = choose_champion(candidates)
        preferred: dict[str, Any] = {}
        if cfg.champion_choice == "prefer_ensemble":
            champion, preferred = prefer_ensemble(champion, candidates, oof if folds is not None else validation, cfg)
        champion = crown(champion, cfg.champion_metric, paths.details / ensemble.FILE, served, basis, preferred)
        verdicts = {"test": champion_verdicts(predictions, champion, cfg),
                    "out_of_fold": champion_verdicts(oof, champion, cfg)}
        headline = headline_metrics(predictions, champion, cfg, oof, folds)
        write_json(det / "details.json", details)
        write_json(det / "champion.json", champion)
        deep = sorted({(f.name, f.seed, f.task) for f in files if f.is_deep})
        curves.write_curves([(name, s, paths.curves / name / f"seed{s}") for name, s, _ in deep],
                            curves.monitors(params, [n for n, _, t in deep if t == "classification"],
                                            [n for n, _, t in deep if t == "segmentation"]), plot_dir / "curves")
    write_json(paths.metrics, headline)
    with atomic_path(paths.summary) as tmp:
        tmp.write_text(markdown_summary(headline, details, verdicts, champion, test, cfg, untrained))
    return headline


def champion_verdicts(predictions: dict[str, compare.Predictions], champion: dict[str, Any],
                      cfg: EvaluateConfig) -> dict[str, str]:
    """Each classifier's paired verdict against the champion (``within noise`` = statistically tied); none when
    the champion has no such predictions (the ensemble has no out-of-fold ones)."""
    if not champion or cfg.bootstrap_resamples == 0 or champion["model"] not in predictions:
        return {}
    classifiers = {n: p for n, p in predictions.items() if p.kind == compare.CLASSIFIER}
    return compare.ties_with(champion["model"], classifiers, cfg.champion_metric, cfg.bootstrap_resamples,
                             cfg.bootstrap_seed, cfg.confidence)


def by_kind(predictions: dict[str, compare.Predictions], cfg: EvaluateConfig) -> dict[str, Any]:
    """{"classifiers": {model: seed-mean headline metrics}, "segmenters": {...}}."""
    out: dict[str, Any] = {"classifiers": {}, "segmenters": {}}
    for name, p in predictions.items():
        key = "classifiers" if p.kind == compare.CLASSIFIER else "segmenters"
        out[key][name] = rounded(compare.point_estimates(p, ece_bins=cfg.ece_bins))
    return out


def headline_metrics(predictions: dict[str, compare.Predictions], champion: dict[str, Any], cfg: EvaluateConfig,
                     oof: dict[str, compare.Predictions] | None = None, folds: Folds | None = None) -> dict[str, Any]:
    """What ``metrics/evaluate.json`` holds: seed-mean headline metrics per model (test split; with cross-validation
    also out-of-fold on train + val), and the champion with the score that chose it."""
    headline = by_kind(predictions, cfg)
    if folds is not None:
        headline["out_of_fold"] = {"folds": folds.k, "images": len(folds.pool), **by_kind(oof or {}, cfg)}
    if champion:
        basis = "validation" if folds is None else "out_of_fold"
        headline["champion"] = {"model": champion["model"],
                                f"{basis}_{cfg.champion_metric}": round(champion["validation_score"], 4)}
    return headline
