"""Classification metrics from probabilities; undefined values are reported as None, not a crash."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """Accuracy, balanced accuracy, macro F1 and one-vs-rest macro ROC AUC of ``proba`` (N, C)."""
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    y_pred = proba.argmax(axis=1)
    labels = np.arange(proba.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result: dict[str, float | None] = {
            "accuracy": float(skm.accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
            "f1_macro": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        }
        result["roc_auc"] = roc_auc_ovr(y_true, proba)
    return result


def roc_auc_ovr(y_true: np.ndarray, proba: np.ndarray) -> float | None:
    """Macro one-vs-rest ROC AUC over the classes present; None when fewer than two classes are present."""
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    scores = []
    for c in present:
        positive = (y_true == c).astype(int)
        scores.append(skm.roc_auc_score(positive, proba[:, c]))
    return float(np.mean(scores))
