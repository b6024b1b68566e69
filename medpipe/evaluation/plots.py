"""Plot data for ``dvc plots`` (CSV, one file per model) and PNG figures for people (one set per model:
an overview, the confusion matrix with counts and row rates, the reliability diagram with its ECE and bin counts).

ROC and precision-recall curves are tabulated on a fixed grid (false-positive rate, recall: 0, 0.01,
..., 1) so that curves of two revisions line up row by row in ``dvc plots diff``: ``tpr``/``precision``
is the macro average over the classes present, ``tpr_<class>``/``precision_<class>`` the one-vs-rest
curve of each class (precision interpolated as the best precision at that recall or more).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from medpipe.evaluation.calibration import reliability_curve
from medpipe.io import atomic_path

GRID = np.linspace(0.0, 1.0, 101)


def _present(y_true: np.ndarray, c: int) -> bool:
    positives = int((y_true == c).sum())
    return 0 < positives < len(y_true)


def roc_table(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> list[dict[str, float]]:
    curves = {}
    for c, name in enumerate(class_names):
        if _present(y_true, c):
            fpr, tpr, _ = skm.roc_curve(y_true == c, proba[:, c])
            curves[name] = np.interp(GRID, fpr, tpr)
    macro = np.mean(list(curves.values()), axis=0) if curves else np.full_like(GRID, np.nan)
    return [
        {"fpr": round(float(x), 4), "tpr": round(float(macro[i]), 6),
         **{f"tpr_{name}": round(float(curve[i]), 6) for name, curve in curves.items()}}
        for i, x in enumerate(GRID)
    ]


def pr_table(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> list[dict[str, float]]:
    curves = {}
    for c, name in enumerate(class_names):
        if (y_true == c).any():
            precision, recall, _ = skm.precision_recall_curve(y_true == c, proba[:, c])
            # recall is decreasing: the running maximum from the end is the interpolated precision
            best = np.maximum.accumulate(precision[::-1])[::-1]
            curves[name] = np.array([best[recall >= r].max() for r in GRID])
    macro = np.mean(list(curves.values()), axis=0) if curves else np.full_like(GRID, np.nan)
    return [
        {"recall": round(float(r), 4), "precision": round(float(macro[i]), 6),
         **{f"precision_{name}": round(float(curve[i]), 6) for name, curve in curves.items()}}
        for i, r in enumerate(GRID)
    ]


def per_class(rows: list[dict[str, float]], x: str, y: str) -> list[dict[str, float | str]]:
    """A wide ROC/PR table (``x``, macro ``y``, ``y_<class>``...) as one row per point and curve, ``class`` naming
    the curve (``macro`` for the average): DVC's ``by_class`` template draws a line per class."""
    long: list[dict[str, float | str]] = []
    for row in rows:
        long.append({x: row[x], "class": "macro", y: row[y]})
        long += [{x: row[x], "class": key[len(y) + 1:], y: value} for key, value in row.items()
                 if key.startswith(f"{y}_")]
    return long


def confusion_rows(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> list[dict[str, str]]:
    return [{"actual": class_names[t], "predicted": class_names[p]} for t, p in zip(y_true, y_pred, strict=True)]


def calibration_rows(y_true: np.ndarray, proba: np.ndarray, bins: int,
                     proba_scaled: np.ndarray | None = None) -> list[dict[str, float]]:
    """Reliability curve rows; with ``proba_scaled`` also the curve after temperature scaling."""
    rows = [{"confidence": round(r["confidence"], 6), "accuracy": round(r["accuracy"], 6), "count": r["count"],
             "calibration": "before"} for r in reliability_curve(y_true, proba, bins)]
    if proba_scaled is not None:
        rows += [{"confidence": round(r["confidence"], 6), "accuracy": round(r["accuracy"], 6),
                  "count": r["count"], "calibration": "temperature_scaled"}
                 for r in reliability_curve(y_true, proba_scaled, bins)]
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(true class, predicted class) counts."""
    index = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def confusion_cells(counts: np.ndarray) -> list[list[str]]:
    """Each cell's text: its count and, below it, its share of the true class (row rate); "-" for an empty row."""
    support = counts.sum(axis=1)
    return [[f"{counts[i, j]}\n({counts[i, j] / support[i]:.2f})" if support[i] else f"{counts[i, j]}\n(-)"
             for j in range(counts.shape[1])] for i in range(counts.shape[0])]


def draw_confusion(fig, counts: np.ndarray, class_names: Sequence[str], title: str) -> None:
    """The confusion matrix on ``fig`` (a Figure or SubFigure), cells shaded by their row rate."""
    from medpipe.evaluation import figures

    n = len(class_names)
    support = counts.sum(axis=1)
    rates = np.divide(counts, support[:, None], out=np.zeros(counts.shape), where=support[:, None] > 0)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap=figures.RATE_CMAP, vmin=0.0, vmax=1.0)
    size = max(6.0, 12.0 - 0.6 * n)
    for (i, j), text in np.ndenumerate(np.array(confusion_cells(counts), dtype=object)):
        ax.text(j, i, text, ha="center", va="center", fontsize=size,
                color="white" if rates[i, j] > figures.TEXT_COLOUR_ON_DARK else "black")
    ax.set_xticks(range(n), labels=list(class_names), rotation=30 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), labels=[f"{name}\n(n = {s})" for name, s in zip(class_names, support, strict=True)])
    ax.set(xlabel="predicted class", ylabel="true class", title="each cell: images (share of the true class)")
    ax.tick_params(length=0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class (row rate)")
    fig.suptitle(title)


def draw_reliability(fig, y_true: np.ndarray, curves: Sequence[tuple[str, np.ndarray]], bins: int,
                     title: str) -> None:
    """Reliability curves with the diagonal and each curve's ECE, over the number of images in each bin."""
    from medpipe.evaluation import figures

    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], ":", color="0.45", lw=1, label="perfect calibration")
    width = 1.0 / bins / max(1, len(curves))
    for k, ((label, proba), colour, marker) in enumerate(zip(curves, figures.OKABE_ITO, "os^D", strict=False)):
        curve = reliability_curve(y_true, proba, bins)
        ece = expected_calibration_error(curve)
        ax.plot([r["confidence"] for r in curve], [r["accuracy"] for r in curve], marker + "-", color=colour,
                ms=4, label=f"{label}: ECE {ece:.3f}")
        bars = hist.bar([r["bin"] / bins + width * (k + 0.5) for r in curve], [r["count"] for r in curve],
                        width=width * 0.9, color=colour, label=label)
        hist.bar_label(bars, fontsize=6, padding=1)
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
           title=f"top-label reliability, {bins} equal-width confidence bins")
    ax.legend(loc="best")
    hist.set(xlabel="confidence (top-label probability)", ylabel="images per bin")
    hist.set_ylim(0, max([1.0, *(b.get_height() for b in hist.patches)]) * 1.35)
    hist.set_xticks(np.linspace(0, 1, 6))
    fig.suptitle(title)


def draw_roc(fig, y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str], title: str) -> None:
    ax = fig.subplots()
    for c, name in enumerate(class_names):
        if _present(y_true, c):
            fpr, tpr, _ = skm.roc_curve(y_true == c, proba[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {skm.auc(fpr, tpr):.2f})")
    ax.plot([0, 1], [0, 1], ":", color="0.45", lw=1, label="chance")
    ax.set(xlabel="false-positive rate (1 - specificity)", ylabel="true-positive rate (sensitivity)",
           xlim=(0, 1), ylim=(0, 1.02), title="each class against the rest")
    ax.legend(loc="lower right")
    fig.suptitle(title)


def draw_pr(fig, y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str], title: str) -> None:
    ax = fig.subplots()
    for c, name in enumerate(class_names):
        if (y_true == c).any():
            precision, recall, _ = skm.precision_recall_curve(y_true == c, proba[:, c])
            ap = skm.average_precision_score(y_true == c, proba[:, c])
            ax.plot(recall, precision, drawstyle="steps-post", label=f"{name} (AP {ap:.2f})")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (positive predictive value)", xlim=(0, 1),
           ylim=(0, 1.02), title="each class against the rest")
    ax.legend(loc="lower left")
    fig.suptitle(title)


def expected_calibration_error(curve: list[dict[str, float]]) -> float:
    """The ECE of a reliability curve: the count-weighted mean gap between confidence and accuracy."""
    total = sum(r["count"] for r in curve)
    return sum(r["count"] * abs(r["confidence"] - r["accuracy"]) for r in curve) / total if total else float("nan")


def _calibration_curves(proba: np.ndarray, proba_scaled: np.ndarray | None,
                        temperature: float | None) -> list[tuple[str, np.ndarray]]:
    if proba_scaled is None:
        return [("model probabilities", proba)]
    after = "after temperature scaling" + (f" (T = {temperature:.2f})" if temperature is not None else "")
    return [("before temperature scaling", proba), (after, proba_scaled)]


def _images(n: int) -> str:
    return f"n = {n} image{'s' if n != 1 else ''}"


def confusion_figure(path: Path, model: str, y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
                     split: str = "test split"):
    """The confusion matrix PNG of one model: count and row rate in each cell; returns the Figure."""
    from medpipe.evaluation import figures

    n = len(class_names)
    with figures.style():
        fig = figures.new_figure(figsize=(2.6 + 1.15 * n, 1.9 + 1.0 * n))
        draw_confusion(fig, confusion_counts(y_true, y_pred, n), class_names,
                       f"{model}: confusion matrix, {split} ({_images(len(y_true))})")
        figures.save_png(fig, path)
    return fig


def reliability_figure(path: Path, model: str, y_true: np.ndarray, proba: np.ndarray, bins: int,
                       proba_scaled: np.ndarray | None = None, temperature: float | None = None,
                       split: str = "test split"):
    """The reliability PNG of one model: curve(s) with ECE, diagonal, images per bin; returns the Figure."""
    from medpipe.evaluation import figures

    with figures.style():
        fig = figures.new_figure(figsize=(6.0, 6.2))
        draw_reliability(fig, y_true, _calibration_curves(proba, proba_scaled, temperature), bins,
                         f"{model}: calibration, {split} ({_images(len(y_true))})")
        figures.save_png(fig, path)
    return fig


def model_figure(path: Path, model: str, y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str],
                 bins: int, proba_scaled: np.ndarray | None = None, temperature: float | None = None,
                 split: str = "test split"):
    """One overview PNG per model: confusion matrix, ROC and PR curves per class, reliability diagram."""
    from medpipe.evaluation import figures

    with figures.style():
        fig = figures.new_figure(figsize=(12, 11))
        fig.suptitle(f"{model}, {split} ({_images(len(y_true))})", fontsize=13)
        (confusion, roc), (pr, reliability) = fig.subfigures(2, 2)
        draw_confusion(confusion, confusion_counts(y_true, proba.argmax(axis=1), len(class_names)), class_names,
                       "confusion matrix")
        draw_roc(roc, y_true, proba, class_names, "ROC curves")
        draw_pr(pr, y_true, proba, class_names, "precision-recall curves")
        draw_reliability(reliability, y_true, _calibration_curves(proba, proba_scaled, temperature), bins,
                         "calibration")
        figures.save_png(fig, path)
    return fig
