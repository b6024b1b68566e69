"""The Markdown comparison of all models (``metrics/summary.md``): headline with verdicts, then details."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medpipe.data.imageset import ImageSet
from medpipe.evaluation.compare import CLASSIFIER_METRICS, SEGMENTER_METRICS
from medpipe.evaluation.config import EvaluateConfig
from medpipe.evaluation.scores import GLOBAL_METRICS, LOWER_IS_BETTER


def fmt(result: dict[str, Any], key: str, digits: int = 3) -> str:
    """``value [low, high]`` when the result holds an interval for ``key``."""
    value = result.get(key)
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    low, high = result.get(f"{key}_ci_low"), result.get(f"{key}_ci_high")
    if low is not None and high is not None:
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def mean_std_text(detail: dict[str, Any], key: str, digits: int = 3) -> str:
    """``mean ± std`` over seeds (``mean`` alone for one seed)."""
    mean, std = detail["mean"].get(key), detail["std"].get(key)
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def first_seed(detail: dict[str, Any]) -> dict[str, Any]:
    return next(iter(detail["seeds"].values()))


def headline_tables(headline: dict[str, Any], details: dict[str, Any], verdicts: dict[str, str],
                    champion: dict[str, Any]) -> list[str]:
    lines = []
    if headline["classifiers"]:
        rows = []
        for name in headline["classifiers"]:
            verdict = "champion" if champion and name == champion["model"] else verdicts.get(name, "")
            seeds = len(details[name]["headline_per_seed"])
            rows.append([f"`{name}`", str(seeds), *(mean_std_text(details[name], m) for m in CLASSIFIER_METRICS),
                         verdict])
        lines += ["## Classifiers (test split; mean ± std over training seeds)", ""]
        lines += table(["model", "seeds", *CLASSIFIER_METRICS, "vs champion"], rows)
        lines += ["", "`vs champion`: paired bootstrap of the difference on the same test images (all seeds); "
                  "`within noise` = statistically tied with the champion.", ""]
    if headline["segmenters"]:
        scored = [(f"`{name}`", details[name]) for name in headline["segmenters"]]
        scored += [(f"`{name}` + TTA", details[name]["tta"]) for name in headline["segmenters"]
                   if "tta" in details[name]]
        rows = [[label, str(len(d["headline_per_seed"])), *(mean_std_text(d, m) for m in SEGMENTER_METRICS)]
                for label, d in scored]
        lines += ["## Segmenters (test images with a lesion; HD95 in px)", ""]
        lines += table(["model", "seeds", *SEGMENTER_METRICS], rows) + [""]
    return lines


def out_of_fold_tables(headline: dict[str, Any], details: dict[str, Any], verdicts: dict[str, str],
                       champion: dict[str, Any], cfg: EvaluateConfig) -> list[str]:
    """The out-of-fold section (cross-validation only): every train + val image scored by the fold model that
    never saw it; the seed mean with its interval over those images, and each classifier's verdict."""
    oof = headline.get("out_of_fold")
    if not oof:
        return []
    lines = [f"## Out-of-fold ({oof['folds']} folds, {oof['images']} train + val images; seed mean with "
             f"{cfg.confidence:.0%} BCa interval)", "",
             "Each image is predicted by the model of the fold that held it out; the champion is chosen on these "
             "scores. The test-split tables below score the average of the fold models.", ""]
    for kind, metrics in (("classifiers", CLASSIFIER_METRICS), ("segmenters", SEGMENTER_METRICS)):
        if not oof[kind]:
            continue
        rows = []
        for name in oof[kind]:
            result = details[name]["out_of_fold"]
            verdict = "champion" if champion and name == champion["model"] else verdicts.get(name, "")
            rows.append([f"`{name}`", str(result["images"]), *(fmt(result["seed_mean"], m) for m in metrics)]
                        + ([verdict] if kind == "classifiers" else []))
        header = ["model", "images", *metrics] + (["vs champion"] if kind == "classifiers" else [])
        lines += table(header, rows) + [""]
    return lines


def detail_tables(details: dict[str, Any], class_names: Sequence[str],
                  fitted_on: str = "the validation split") -> list[str]:
    """Every metric with its interval, per class, calibration and TTA (first seed of each classifier)."""
    classifiers = {name: first_seed(d) for name, d in details.items() if "accuracy" in d["mean"]}
    if not classifiers:
        return []
    lines = ["## All metrics (first seed, with 95% bootstrap intervals)", ""]
    rows = [[f"`{name}`", *(fmt(r, k) for k in GLOBAL_METRICS)] for name, r in classifiers.items()]
    rows += [[f"`{name}` + TTA", *(fmt(r["tta"], k) for k in GLOBAL_METRICS)]
             for name, r in classifiers.items() if "tta" in r]
    lines += table(["model", *GLOBAL_METRICS], rows)
    lines += ["", "## Per class: sensitivity (recall) / specificity / precision / F1", ""]
    header = ["model"] + [f"{c} {m}" for c in class_names for m in ("sens.", "spec.", "prec.", "F1")]
    lines += table(header, [[f"`{name}`"] + [fmt(r, f"{m}_{c}", 2) for c in class_names
                                             for m in ("recall", "specificity", "precision", "f1")]
                            for name, r in classifiers.items()])
    calibrated = {name: r for name, r in classifiers.items() if r.get("temperature") is not None}
    if calibrated:
        lines += ["", f"## Calibration: temperature scaling fitted on {fitted_on}", ""]
        lines += table(["model", "temperature", "ECE before", "ECE after", "log loss before", "log loss after"],
                       [[f"`{name}`", f"{r['temperature']:.3f}", fmt(r, "ece"), fmt(r, "ece_ts"), fmt(r, "log_loss"),
                         fmt(r, "log_loss_ts")] for name, r in calibrated.items()])
    return lines


def not_trained_lines(untrained: dict[str, str]) -> list[str]:
    """One line per selected model that has no predictions, with the reason its training stage recorded."""
    if not untrained:
        return []
    return ["**Not trained:** " + "; ".join(f"`{name}` ({reason})" for name, reason in sorted(untrained.items())) + ".",
            ""]


def markdown_summary(headline: dict[str, Any], details: dict[str, Any], verdicts: dict[str, dict[str, str]],
                     champion: dict[str, Any], test: ImageSet, cfg: EvaluateConfig,
                     untrained: dict[str, str] | None = None) -> str:
    """``verdicts``: {"test": {model: verdict vs champion}, "out_of_fold": {...}}; ``untrained``: {model: why it
    was not trained} for the selected models without predictions."""
    counts = test.class_counts()
    lines = [
        "# Test-split evaluation", "",
        f"Test images: {len(test)} (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + "). "
        f"Intervals and verdicts: {cfg.confidence:.0%} BCa (bias-corrected and accelerated) bootstrap over "
        f"test images ({cfg.bootstrap_resamples} resamples). Lower is better for "
        + ", ".join(sorted(LOWER_IS_BETTER | {"hd95"})) + "; higher for the rest.", "",
    ]
    if champion:
        lines += [f"**Champion** (by {champion['selected_by']} = {champion['validation_score']:.4f}): "
                  f"`{champion['model']}` (`medpipe-promote` gives it the MLflow `champion` alias)", ""]
    lines += not_trained_lines(untrained or {})
    lines += out_of_fold_tables(headline, details, verdicts.get("out_of_fold", {}), champion, cfg)
    lines += headline_tables(headline, details, verdicts.get("test", {}), champion)
    fitted_on = "the out-of-fold predictions" if headline.get("out_of_fold") else "the validation split"
    lines += detail_tables(details, test.class_names, fitted_on)
    return "\n".join(lines) + "\n"
