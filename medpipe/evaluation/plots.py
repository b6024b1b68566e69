"""Plot data for ``dvc plots`` (CSV, one file per model) and PNG figures for people.

ROC and precision-recall curves are tabulated on a fixed grid (false-positive rate, recall: 0, 0.01,
..., 1) so that curves of two revisions line up row by row in ``dvc plots diff``: ``tpr``/``precision``
is the macro average over the classes present, ``tpr_<class>``/``precision_<class>`` the one-vs-rest
curve of each class (precision interpolated as the best precision at that recall or more).
"""

from __future__ import annotations

import csv
import warnings
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


def model_figure(path: Path, title: str, y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str],
                 bins: int, proba_scaled: np.ndarray | None = None) -> None:
    """One PNG per model: confusion matrix, ROC and PR curves per class, reliability diagram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 9))
    labels = np.arange(len(class_names))
    skm.ConfusionMatrixDisplay.from_predictions(
        y_true, proba.argmax(axis=1), labels=labels, display_labels=list(class_names), ax=axes[0, 0],
        colorbar=False)
    axes[0, 0].set_title("confusion matrix (test)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c, name in enumerate(class_names):
            if _present(y_true, c):
                skm.RocCurveDisplay.from_predictions(y_true == c, proba[:, c], name=name, ax=axes[0, 1])
                skm.PrecisionRecallDisplay.from_predictions(y_true == c, proba[:, c], name=name, ax=axes[1, 0])
    axes[0, 1].plot([0, 1], [0, 1], "k:", lw=1)
    axes[0, 1].set_title("ROC, one-vs-rest")
    axes[1, 0].set_title("precision-recall, one-vs-rest")
    ax = axes[1, 1]
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    for label, p in (("before", proba), ("temperature scaled", proba_scaled)):
        if p is not None:
            curve = reliability_curve(y_true, p, bins)
            ax.plot([r["confidence"] for r in curve], [r["accuracy"] for r in curve], "o-", label=label)
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
           title="reliability diagram")
    ax.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
