"""Segmentation metrics on binary masks: per-image Dice, IoU and HD95, the pooled pixel table, and
bootstrap intervals.

Conventions (stated so a reader can compare with other papers):
- Dice, IoU and HD95 are per image, over the images whose true mask is non-empty ("lesion images").
  Images with an empty true mask (BUSI's normal images) are scored separately: the right answer
  there is an empty prediction, so we report how often the prediction is empty and the mean
  false-positive area (fraction of the image).
- HD95 (pixels of the evaluated grid) is the larger of the two directed 95th percentiles of the
  distances between the mask boundaries, as in MONAI's ``compute_hausdorff_distance(percentile=95)``.
  It is undefined when the prediction is empty; such images are counted (``hd95_undefined``) and
  left out of the HD95 summary, never scored as 0.
- The pixel table (accuracy, and precision/recall/F1 of the lesion and background classes) pools
  the pixels of every image of the split, as the BUSI study's table does.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, stats


def _as_bool(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask).astype(bool)


def dice_score(true: np.ndarray, pred: np.ndarray) -> float:
    """2|T and P| / (|T| + |P|); 1.0 when both masks are empty."""
    t, p = _as_bool(true), _as_bool(pred)
    denominator = t.sum() + p.sum()
    if denominator == 0:
        return 1.0
    return float(2 * np.logical_and(t, p).sum() / denominator)


def iou_score(true: np.ndarray, pred: np.ndarray) -> float:
    """|T and P| / |T or P|; 1.0 when both masks are empty."""
    t, p = _as_bool(true), _as_bool(pred)
    union = np.logical_or(t, p).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(t, p).sum() / union)


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)


def hd95(true: np.ndarray, pred: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance between the boundaries, in pixels.

    0.0 when both masks are empty; NaN when exactly one of them is empty (undefined).
    """
    t, p = _as_bool(true), _as_bool(pred)
    if not t.any() and not p.any():
        return 0.0
    if not t.any() or not p.any():
        return float("nan")
    bt, bp = _boundary(t), _boundary(p)
    dist_to_t = ndimage.distance_transform_edt(~bt)
    dist_to_p = ndimage.distance_transform_edt(~bp)
    return float(max(np.percentile(dist_to_t[bp], 95), np.percentile(dist_to_p[bt], 95)))


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0,
                 statistic=np.mean, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of ``statistic`` over images (scipy.stats.bootstrap).

    (None, None) when fewer than two values are given; both ends equal when all values are equal.
    """
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if len(values) < 2:
        return None, None
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.bootstrap((values,), statistic, n_resamples=n_resamples, confidence_level=confidence,
                                 method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def pixel_table(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pooled pixel accuracy and per-class precision/recall/F1 (``lesion_*``, ``background_*``)."""
    t, p = _as_bool(true).ravel(), _as_bool(pred).ravel()
    tp = int(np.sum(t & p))
    fp = int(np.sum(~t & p))
    fn = int(np.sum(t & ~p))
    tn = int(np.sum(~t & ~p))

    def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    lp, lr, lf = prf(tp, fp, fn)
    bp, br, bf = prf(tn, fn, fp)
    return {
        "pixel_accuracy": (tp + tn) / max(tp + tn + fp + fn, 1),
        "lesion_precision": lp, "lesion_recall": lr, "lesion_f1": lf,
        "background_precision": bp, "background_recall": br, "background_f1": bf,
    }


def _summary(values: np.ndarray, prefix: str, n_resamples: int, seed: int) -> dict[str, float | None]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return {f"{prefix}_mean": None, f"{prefix}_median": None, f"{prefix}_ci_low": None, f"{prefix}_ci_high": None}
    low, high = bootstrap_ci(finite, n_resamples, seed)
    return {
        f"{prefix}_mean": float(finite.mean()),
        f"{prefix}_median": float(np.median(finite)),
        f"{prefix}_ci_low": low,
        f"{prefix}_ci_high": high,
    }


def per_image_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Dice, IoU, HD95 and predicted/true areas of every image of (N, H, W) masks."""
    true, pred = _as_bool(true), _as_bool(pred)
    if true.shape != pred.shape or true.ndim != 3:
        raise ValueError(f"masks must both be (N, H, W), got {true.shape} and {pred.shape}")
    return {
        "dice": np.array([dice_score(t, p) for t, p in zip(true, pred, strict=True)]),
        "iou": np.array([iou_score(t, p) for t, p in zip(true, pred, strict=True)]),
        "hd95": np.array([hd95(t, p) for t, p in zip(true, pred, strict=True)]),
        "true_area": true.reshape(len(true), -1).mean(1),
        "pred_area": pred.reshape(len(pred), -1).mean(1),
    }


def segmentation_report(true: np.ndarray, pred: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Everything the ``segment`` stage reports for one split, flat enough for ``dvc metrics diff``."""
    scores = per_image_scores(true, pred)
    lesion = scores["true_area"] > 0
    report: dict = {"images": int(len(lesion)), "lesion_images": int(lesion.sum()),
                    "empty_images": int((~lesion).sum())}
    for name in ("dice", "iou", "hd95"):
        report.update(_summary(scores[name][lesion], name, n_resamples, seed))
    report["hd95_undefined"] = int(np.sum(lesion & (scores["pred_area"] == 0)))
    report.update(pixel_table(true, pred))
    empty = ~lesion
    report["empty_correct_rate"] = float(np.mean(scores["pred_area"][empty] == 0)) if empty.any() else None
    report["empty_fp_area_mean"] = float(np.mean(scores["pred_area"][empty])) if empty.any() else None
    return report
