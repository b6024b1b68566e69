"""Temperature scaling (Guo et al. 2017) and reliability-curve data.

Temperature scaling works on log-probabilities: ``softmax(log p / T)`` equals ``softmax(z / T)`` for
the logits ``z`` behind ``p`` (the two differ by a per-row constant), so it applies to any model that
outputs probabilities - deep or classical - without access to its logits. ``T`` is fitted on the
validation split by minimising the negative log-likelihood; it never changes the predicted class.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from medpipe.predictors import apply_temperature, log_proba  # the served ensemble applies it too

__all__ = ["apply_temperature", "fit_temperature", "reliability_curve"]


def fit_temperature(proba: np.ndarray, y_true: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising the mean negative log-likelihood of ``y_true`` under ``proba``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) == 0:
        raise ValueError("cannot fit a temperature on an empty split")
    log_p = log_proba(proba)
    rows = np.arange(len(y_true))

    def nll(log_t: float) -> float:
        return float(-log_softmax(log_p / np.exp(log_t), axis=1)[rows, y_true].mean())

    result = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                             options={"xatol": 1e-6})
    return float(np.exp(result.x))


def reliability_curve(y_true: np.ndarray, proba: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Top-label reliability diagram: per non-empty confidence bin ``(bin/bins, (bin+1)/bins]``, its index,
    mean confidence, accuracy and count."""
    y_true = np.asarray(y_true)
    confidence = np.asarray(proba).max(axis=1)
    correct = np.asarray(proba).argmax(axis=1) == y_true
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        if members.any():
            rows.append({
                "bin": b,
                "confidence": float(confidence[members].mean()),
                "accuracy": float(correct[members].mean()),
                "count": int(members.sum()),
            })
    return rows
