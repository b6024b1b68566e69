"""Test-split classification metrics with BCa bootstrap confidence intervals.

Every metric is written once, as a function of per-image *weights* ``W`` of shape (B, N): the point
estimate uses one row of ones, and the bootstrap uses B rows of multinomial counts (drawing N images
with replacement is the same as weighting each image by how often it was drawn). So all metrics of
all resamples come from a few matrix products, and the point estimate and the intervals can never
disagree about a definition. The unit tests check every value against scikit-learn (whose
``sample_weight`` gives the same weighted definitions).

Undefined values are NaN inside this module and ``None`` in reports: a class absent from the split
has no recall (sensitivity) and no one-vs-rest AUC/AP; a class never predicted has no precision.
Macro averages (balanced accuracy, macro F1, macro AUC, macro AP) average the classes where the value
is defined, as scikit-learn does for balanced accuracy.

Intervals are BCa (bias-corrected and accelerated, Efron & Tibshirani 1993, ch. 14), not percentile
intervals: several metrics are skewed or biased under resampling (the ECE of a resample is biased
upward, HD95 has a long right tail), so the percentile interval sits lopsided around the point
estimate and can miss it. BCa reads its endpoints from the same bootstrap distribution at levels
shifted by the bias correction ``z0`` (where the point estimate falls in that distribution) and the
acceleration ``a`` (the skewness of the leave-one-image-out jackknife), which makes it
transformation-respecting and second-order accurate. :func:`bca_interval` is the formula of
``scipy.stats.bootstrap(..., method="BCa")`` (the tests check the two agree on the same resamples);
the jackknife is one more set of weight rows (:func:`jackknife_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy.special import ndtr, ndtri

GLOBAL_METRICS = (
    "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "roc_auc", "average_precision",
    "log_loss", "ece",
)
PER_CLASS_METRICS = ("precision", "recall", "specificity", "f1")
LOWER_IS_BETTER = frozenset({"log_loss", "ece"})
PROBA_EPS = np.finfo(np.float64).eps
JACKKNIFE_BATCH = 1024   # leave-one-out weight rows evaluated at a time (bounds memory on large test splits)
_TIE_RTOL = 1e-10        # values this close (relative to max(1, |value|)) are equal: rounding, not signal


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    defined = ~np.isnan(values)
    count = defined.sum(axis=axis)
    total = np.where(defined, values, 0.0).sum(axis=axis)
    return _divide(total, count.astype(np.float64))


def _tie_groups(scores: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sort order of ``scores`` and the start index of each run of equal scores in that order."""
    order = np.argsort(-scores if descending else scores, kind="mergesort")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    return order, starts


def _ranking_metrics(y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ROC AUC and average precision per class, (B, C) each, for weighted samples."""
    n_boot, n_classes = weights.shape[0], proba.shape[1]
    auc = np.full((n_boot, n_classes), np.nan)
    ap = np.full((n_boot, n_classes), np.nan)
    for c in range(n_classes):
        positive = y_true == c
        w_pos = weights * positive
        w_neg = weights * ~positive
        total_pos, total_neg = w_pos.sum(axis=1), w_neg.sum(axis=1)
        # ROC AUC = P(score of a positive > score of a negative) + 0.5 P(tie): Mann-Whitney U.
        order, starts = _tie_groups(proba[:, c], descending=False)
        pos_group = np.add.reduceat(w_pos[:, order], starts, axis=1)
        neg_group = np.add.reduceat(w_neg[:, order], starts, axis=1)
        neg_below = np.cumsum(neg_group, axis=1) - neg_group
        u_stat = (pos_group * (neg_below + 0.5 * neg_group)).sum(axis=1)
        auc[:, c] = _divide(u_stat, total_pos * total_neg)
        # Average precision = sum over thresholds of (recall step) x precision, as scikit-learn.
        order, starts = _tie_groups(proba[:, c], descending=True)
        tp_group = np.add.reduceat(w_pos[:, order], starts, axis=1)
        fp_group = np.add.reduceat(w_neg[:, order], starts, axis=1)
        tp_cum, fp_cum = np.cumsum(tp_group, axis=1), np.cumsum(fp_group, axis=1)
        precision = _divide(tp_cum, tp_cum + fp_cum)
        ap[:, c] = _divide((tp_group * np.nan_to_num(precision)).sum(axis=1), total_pos)
    return auc, ap


def weighted_metrics(
    y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray, class_names: Sequence[str], ece_bins: int = 15
) -> dict[str, np.ndarray]:
    """Every metric for each row of ``weights`` (B, N): a dict of name -> (B,) arrays, NaN where undefined."""
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n_classes = proba.shape[1]
    if len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class names for {n_classes} probability columns")
    eye = np.eye(n_classes)
    y_pred = proba.argmax(axis=1)
    pairs = (eye[y_true][:, :, None] * eye[y_pred][:, None, :]).reshape(len(y_true), -1)
    cm = (weights @ pairs).reshape(-1, n_classes, n_classes)  # (B, true, predicted)
    n = weights.sum(axis=1)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    fp, fn = predicted - tp, support - tp
    tn = n[:, None] - tp - fp - fn
    per_class = {
        "precision": _divide(tp, predicted),
        "recall": _divide(tp, support),
        "specificity": _divide(tn, tn + fp),
        "f1": _divide(2 * tp, 2 * tp + fp + fn),
    }
    out: dict[str, np.ndarray] = {
        "accuracy": _divide(tp.sum(axis=1), n),
        "balanced_accuracy": _nanmean(per_class["recall"], axis=1),
        "f1_macro": _nanmean(per_class["f1"], axis=1),
        "f1_weighted": _divide(np.nan_to_num(per_class["f1"] * support).sum(axis=1), n),
    }
    auc, ap = _ranking_metrics(y_true, proba, weights)
    out["roc_auc"] = _nanmean(auc, axis=1)
    out["average_precision"] = _nanmean(ap, axis=1)
    p_true = np.clip(proba[np.arange(len(y_true)), y_true], PROBA_EPS, 1.0)
    out["log_loss"] = _divide(weights @ -np.log(p_true), n)
    confidence = proba.max(axis=1)
    bins = np.clip(np.ceil(confidence * ece_bins).astype(int) - 1, 0, ece_bins - 1)
    in_bin = np.eye(ece_bins)[bins]  # (N, bins): top-label reliability bins (lo, hi]
    gap = weights @ (in_bin * (confidence - (y_pred == y_true))[:, None])
    out["ece"] = _divide(np.abs(gap).sum(axis=1), n)
    for metric, values in per_class.items():
        for c, name in enumerate(class_names):
            out[f"{metric}_{name}"] = values[:, c]
    for c, name in enumerate(class_names):
        out[f"auc_{name}"] = auc[:, c]
        out[f"support_{name}"] = support[:, c]
    return out


def jackknife_rows(n: int, batch: int = JACKKNIFE_BATCH) -> Iterator[np.ndarray]:
    """Leave-one-out weight rows, up to ``batch`` at a time: row i weighs every image 1 but image i (0)."""
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        rows = np.ones((stop - start, n))
        rows[np.arange(stop - start), np.arange(start, stop)] = 0.0
        yield rows


def jackknife(rows: Callable[[np.ndarray], dict[str, np.ndarray]], n: int) -> dict[str, np.ndarray]:
    """{metric: (n,) leave-one-image-out values} of ``rows`` (weight rows (R, n) -> {metric: (R,) values})."""
    parts = [rows(w) for w in jackknife_rows(n)]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _tolerance(value: float) -> float:
    return _TIE_RTOL * max(1.0, abs(float(value)))


def acceleration(jackknife_values: np.ndarray) -> float:
    """BCa acceleration from leave-one-out values: their skewness / 6 (Efron & Tibshirani eq. 14.15).

    NaN values (undefined without that image) are left out; 0 when fewer than two remain or all are
    equal (a constant jackknife has no skewness to correct).
    """
    values = np.asarray(jackknife_values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return 0.0
    mean = values.mean()
    if values.max() - values.min() <= _tolerance(mean):
        return 0.0
    deviation = mean - values
    return float((deviation**3).sum() / (6.0 * (deviation**2).sum() ** 1.5))


def bca_interval(point: float, replicates: np.ndarray, jackknife_values: np.ndarray,
                 confidence: float = 0.95) -> tuple[float, float]:
    """BCa bootstrap interval (low, high) of a statistic: NaN, NaN where undefined.

    ``point``: the estimate on all images; ``replicates``: its value on each bootstrap resample (NaN
    resamples, where the statistic is undefined, are left out); ``jackknife_values``: its value with
    each image left out in turn. The endpoints are the quantiles of the replicates (linear
    interpolation, as ``np.percentile``) at ``Phi(z0 + (z0 + z) / (1 - a (z0 + z)))`` for
    ``z = Phi^-1((1 -/+ confidence) / 2)``, where ``z0 = Phi^-1(p)``, ``p`` the fraction of replicates
    below the point (ties count half, as scipy) and ``a`` the :func:`acceleration`: the formula of
    ``scipy.stats.bootstrap(method="BCa")``. Like the percentile interval it holds the point only
    while the point lies within the central ``confidence`` share of the replicates (``|z0| < |z|``);
    what it moves is where the endpoints sit around the point (towards the side the bias hides).

    Degenerate cases: replicates all equal give the point itself (zero width); when the point lies
    outside the whole bootstrap distribution (``p`` is 0 or 1, ``z0`` infinite: scipy returns NaN)
    the percentile interval is returned; a level pushed past the end of the distribution by a large
    acceleration reads the end (0 or 1).
    """
    point = float(point)
    values = np.asarray(replicates, dtype=np.float64)
    values = values[~np.isnan(values)]
    if math.isnan(point) or len(values) == 0:
        return math.nan, math.nan
    tol = _tolerance(point)
    if values.max() - values.min() <= tol:
        return point, point
    tail = (1.0 - confidence) / 2
    below = np.count_nonzero(values < point - tol) + np.count_nonzero(values <= point + tol)
    share = below / (2.0 * len(values))
    if share <= 0.0 or share >= 1.0:
        low, high = np.percentile(values, [100 * tail, 100 * (1 - tail)])
        return float(low), float(high)
    z0 = float(ndtri(share))
    a = acceleration(jackknife_values)
    levels = []
    for z in (float(ndtri(tail)), -float(ndtri(tail))):
        shifted = z0 + z
        denominator = 1.0 - a * shifted
        levels.append(float(ndtr(z0 + shifted / denominator)) if denominator > 0 else float(shifted > 0))
    low, high = np.percentile(values, [100 * levels[0], 100 * levels[1]])
    return float(low), float(high)


def _clean(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def evaluate_with_ci(
    y_true: np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    ece_bins: int = 15,
) -> dict[str, float | None]:
    """Flat ``{metric: value, metric_ci_low: ..., metric_ci_high: ...}``; None where undefined.

    BCa bootstrap over images (:func:`bca_interval`; ``resamples`` = 0 skips the intervals): the
    ``resamples`` multinomial weight rows drawn from ``seed``, and the leave-one-image-out jackknife
    for the acceleration. BCa rather than percentile because ECE, log loss and per-class values are
    skewed or biased under resampling, where the percentile interval sits lopsided around (and can
    miss) the point estimate. A resample where a metric is undefined (a class not drawn) is left out
    of that metric's interval; a metric constant over the resamples gets the point as its interval.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    n = len(y_true)
    if n == 0:
        raise ValueError("cannot evaluate on an empty split")
    point = weighted_metrics(y_true, proba, np.ones((1, n)), class_names, ece_bins)
    result: dict[str, float | None] = {k: _clean(v[0]) for k, v in point.items()}
    for name in class_names:
        result[f"support_{name}"] = int(point[f"support_{name}"][0])
    if resamples <= 0:
        return result
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    boot = weighted_metrics(y_true, proba, weights, class_names, ece_bins)
    jack = jackknife(lambda rows: weighted_metrics(y_true, proba, rows, class_names, ece_bins), n)
    for key, values in boot.items():
        if key.startswith("support_"):
            continue
        low, high = bca_interval(point[key][0], values, jack[key], confidence)
        result[f"{key}_ci_low"] = _clean(low) if result[key] is not None else None
        result[f"{key}_ci_high"] = _clean(high) if result[key] is not None else None
    return result
