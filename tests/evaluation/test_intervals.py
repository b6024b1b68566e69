"""BCa bootstrap intervals: single-model intervals (scores.evaluate_with_ci) and paired differences (compare),
checked against scipy.stats.bootstrap(method="BCa") on the same resamples; skewed and degenerate cases."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from medpipe.evaluation import compare as cmp
from medpipe.evaluation.scores import (
    acceleration,
    bca_interval,
    evaluate_with_ci,
    jackknife,
    jackknife_rows,
    weighted_metrics,
)

BINARY = ("negative", "positive")
ECE_BINS = 15


def multinomial_rows(n: int, resamples: int, seed: int) -> np.ndarray:
    """The bootstrap weight rows of evaluate_with_ci (and the resamples of compare, after its row of ones)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def scipy_bca(data: tuple, statistic, distribution: np.ndarray, confidence: float = 0.95,
              paired: bool = False) -> tuple[float, float]:
    """scipy's BCa interval of ``statistic`` on *our* bootstrap distribution (scipy draws no resample)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template = stats.bootstrap(data, statistic, n_resamples=2, method="percentile", paired=paired, rng=0)
        distribution = np.asarray(distribution, dtype=np.float64)
        given = dataclasses.replace(template, bootstrap_distribution=distribution)
        result = stats.bootstrap(data, statistic, n_resamples=0, bootstrap_result=given, method="BCa",
                                 confidence_level=confidence, paired=paired)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def calibrated_predictions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels and probabilities of a perfectly calibrated model: right as often as it is confident."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.5, 1.0, n)
    right = rng.random(n) < confidence
    labels = rng.integers(0, 2, n)
    predicted = np.where(right, labels, 1 - labels)
    proba = np.empty((n, 2))
    proba[np.arange(n), predicted] = confidence
    proba[np.arange(n), 1 - predicted] = 1 - confidence
    return labels, proba


def ece_of_indices(labels: np.ndarray, proba: np.ndarray):
    """Top-label ECE (15 bins, (lo, hi]) of the images at integer positions, vectorised over leading axes.

    Written independently of weighted_metrics: scipy calls it on index arrays (..., m).
    """
    confidence = proba.max(axis=1)
    gap = confidence - (proba.argmax(axis=1) == labels)
    bins = np.clip(np.ceil(confidence * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)

    def statistic(index, axis=-1):
        index = np.moveaxis(np.asarray(index, dtype=np.int64), axis, -1)
        per_bin = (np.eye(ECE_BINS)[bins[index]] * gap[index][..., None]).sum(axis=-2)
        return np.abs(per_bin).sum(axis=-1) / index.shape[-1]

    return statistic


# --------------------------------------------------------------------------- the formula against scipy


@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_mean_of_an_exponential_sample_matches_scipy_on_the_same_resamples(confidence):
    x = np.random.default_rng(3).exponential(size=40)
    n = len(x)
    replicates = multinomial_rows(n, 2000, seed=0) @ x / n
    jack = jackknife(lambda w: {"mean": w @ x / w.sum(axis=1)}, n)["mean"]
    ours = bca_interval(x.mean(), replicates, jack, confidence)
    assert ours == pytest.approx(scipy_bca((x,), np.mean, replicates, confidence), rel=1e-9)
    # skewed: BCa moves both ends up from the percentile interval, towards the long right tail
    tail = (1 - confidence) / 2 * 100
    percentile = np.percentile(replicates, [tail, 100 - tail])
    assert ours[0] > percentile[0] and ours[1] > percentile[1]


def test_endpoint_formula_reproduces_scipys_own_bootstrap():
    """scipy draws the resamples; our formula on its bootstrap distribution gives its interval."""
    x = np.random.default_rng(4).exponential(size=30)
    result = stats.bootstrap((x,), np.mean, n_resamples=3000, method="BCa", rng=np.random.default_rng(5))
    jack = jackknife(lambda w: {"mean": w @ x / w.sum(axis=1)}, len(x))["mean"]
    ours = bca_interval(x.mean(), result.bootstrap_distribution, jack)
    assert ours == pytest.approx((result.confidence_interval.low, result.confidence_interval.high), rel=1e-9)
    # independent resamples (ours and scipy's) agree to what 3000 resamples allow
    replicates = multinomial_rows(len(x), 3000, seed=0) @ x / len(x)
    independent = bca_interval(x.mean(), replicates, jack)
    assert independent == pytest.approx(ours, abs=0.05)


def test_ratio_statistic_matches_scipy_on_the_same_resamples():
    rng = np.random.default_rng(6)
    numerator, denominator = rng.lognormal(0.0, 0.8, 50), rng.uniform(0.5, 1.5, 50)
    n = len(numerator)

    def ratio(a, b, axis=-1):
        return np.sum(a, axis=axis) / np.sum(b, axis=axis)

    rows = multinomial_rows(n, 2000, seed=1)
    replicates = (rows @ numerator) / (rows @ denominator)
    jack = jackknife(lambda w: {"ratio": (w @ numerator) / (w @ denominator)}, n)["ratio"]
    ours = bca_interval(ratio(numerator, denominator), replicates, jack)
    expected = scipy_bca((numerator, denominator), ratio, replicates, paired=True)
    assert ours == pytest.approx(expected, rel=1e-9)


def test_ece_interval_of_evaluate_with_ci_matches_scipy_on_the_same_resamples():
    labels, proba = calibrated_predictions(60, seed=2)
    n, resamples, seed = len(labels), 1000, 7
    result = evaluate_with_ci(labels, proba, BINARY, resamples=resamples, seed=seed)
    statistic = ece_of_indices(labels, proba)
    assert result["ece"] == pytest.approx(statistic(np.arange(n)))
    distribution = weighted_metrics(labels, proba, multinomial_rows(n, resamples, seed), BINARY)["ece"]
    expected = scipy_bca((np.arange(n),), statistic, distribution)
    assert (result["ece_ci_low"], result["ece_ci_high"]) == pytest.approx(expected, rel=1e-9)


def test_paired_ece_difference_matches_scipy_on_the_same_resamples():
    labels, calibrated = calibrated_predictions(80, seed=3)
    overconfident = np.where(calibrated == calibrated.max(axis=1, keepdims=True), 0.98, 0.02)
    n, resamples, seed = len(labels), 1000, 4
    result = cmp.paired_bootstrap(labels, overconfident[None], calibrated[None], ["ece"], resamples, seed)
    result = result["ece"]
    ece_base, ece_head = ece_of_indices(labels, overconfident), ece_of_indices(labels, calibrated)

    def difference(index, axis=-1):
        return ece_head(index, axis) - ece_base(index, axis)

    rows = np.vstack([np.ones((1, n)), multinomial_rows(n, resamples, seed)])
    assert np.array_equal(rows, cmp._weight_rows(n, resamples, seed))  # the resamples are today's
    distribution = (weighted_metrics(labels, calibrated, rows, BINARY)["ece"]
                    - weighted_metrics(labels, overconfident, rows, BINARY)["ece"])[1:]
    expected = scipy_bca((np.arange(n),), difference, distribution)
    assert (result.ci_low, result.ci_high) == pytest.approx(expected, rel=1e-9)
    assert result.difference == pytest.approx(difference(np.arange(n)))
    assert result.verdict == cmp.verdict(result.ci_low, result.ci_high, lower_is_better=True)


# --------------------------------------------------------------------------- skewed metrics


def test_ece_of_a_well_calibrated_small_sample_is_less_lopsided_than_the_percentile_interval():
    """The ECE of a resample is biased upward: the percentile interval hugs the point from above."""
    labels, proba = calibrated_predictions(40, seed=4)
    n, resamples = len(labels), 2000
    result = evaluate_with_ci(labels, proba, BINARY, resamples=resamples, seed=0)
    point, low, high = result["ece"], result["ece_ci_low"], result["ece_ci_high"]
    distribution = weighted_metrics(labels, proba, multinomial_rows(n, resamples, 0), BINARY)["ece"]
    pct_low, pct_high = np.percentile(distribution, [2.5, 97.5])
    # percentile: about 0.073 [0.062, 0.215], 13 times as far above the point as below
    assert pct_low < point < pct_high and (pct_high - point) > 10 * (point - pct_low)
    # BCa: about 0.073 [0.030, 0.088], covers the point, moved down (against the bias) and far less lopsided
    assert low < point < high
    assert low < pct_low and high < pct_high

    def lopsided(lo: float, hi: float) -> float:
        return max(hi - point, point - lo) / min(hi - point, point - lo)

    assert lopsided(low, high) < lopsided(pct_low, pct_high) / 3


def test_skewed_hd95_difference_verdict_follows_the_bca_interval():
    """One outlier in the head's HD95: the percentile interval reaches below 0, the BCa interval does not."""
    rng = np.random.default_rng(199)
    base = rng.lognormal(2.5, 0.5, 40)
    head = base * rng.lognormal(-0.05, 0.15, 40)
    head[rng.integers(0, 40, 1)] += rng.exponential(40)
    result = cmp.paired_bootstrap_scores({"hd95": base[None]}, {"hd95": head[None]}, resamples=1000)["hd95"]
    rows = cmp._weight_rows(40, 1000, 0)[1:]
    pct_low, pct_high = np.percentile((rows @ head - rows @ base) / 40, [2.5, 97.5])
    assert cmp.verdict(pct_low, pct_high, lower_is_better=True) == cmp.WITHIN_NOISE
    assert 0 < result.ci_low < result.difference < result.ci_high
    assert result.verdict == cmp.WORSE


# --------------------------------------------------------------------------- degenerate cases


def test_constant_metric_gets_the_point_as_its_interval():
    labels = np.arange(30) % 2
    perfect = np.eye(2)[labels] * 0.9 + 0.05
    result = evaluate_with_ci(labels, perfect, BINARY, resamples=200)
    assert result["accuracy"] == result["accuracy_ci_low"] == result["accuracy_ci_high"] == 1.0
    assert bca_interval(0.5, np.full(100, 0.5), np.full(10, 0.5)) == (0.5, 0.5)


def test_identical_predictions_give_a_zero_interval_at_zero():
    labels, proba = calibrated_predictions(50, seed=5)
    for c in cmp.paired_bootstrap(labels, proba[None], proba[None].copy(), resamples=200).values():
        assert (c.difference, c.ci_low, c.ci_high, c.verdict) == (0.0, 0.0, 0.0, cmp.WITHIN_NOISE)


def test_nan_resamples_are_left_out_and_the_auc_interval_stays_defined():
    """One image of the positive class: most resamples lack it (AUC undefined), the rest make the interval."""
    labels = np.array([1] + [0] * 19)
    scores = np.linspace(0.05, 0.6, 20)
    scores[0] = 0.55
    proba = np.stack([1 - scores, scores], axis=1)
    result = evaluate_with_ci(labels, proba, BINARY, resamples=300, seed=1)
    assert result["auc_positive"] is not None
    assert result["auc_positive_ci_low"] <= result["auc_positive"] <= result["auc_positive_ci_high"]
    replicates = np.r_[np.full(50, np.nan), np.random.default_rng(0).normal(size=200)]
    jack = np.r_[np.nan, np.random.default_rng(1).normal(size=30)]
    defined = replicates[~np.isnan(replicates)]
    assert bca_interval(0.0, replicates, jack) == bca_interval(0.0, defined, jack[1:])
    assert all(math.isnan(v) for v in bca_interval(0.0, np.full(10, np.nan), jack))
    assert all(math.isnan(v) for v in bca_interval(math.nan, defined, jack))


def test_constant_jackknife_has_zero_acceleration():
    assert acceleration(np.full(20, 0.3)) == 0.0
    assert acceleration(np.full(20, 0.3) + np.r_[0.0, np.full(19, 1e-17)]) == 0.0  # rounding is not skewness
    assert acceleration(np.array([1.0])) == 0.0 and acceleration(np.array([np.nan, 2.0])) == 0.0
    # a = 0 and the point at the median: BCa is the percentile interval
    replicates = np.random.default_rng(2).normal(size=1001)
    point = float(np.median(replicates))
    assert bca_interval(point, replicates, np.full(5, 1.0)) == pytest.approx(
        tuple(np.percentile(replicates, [2.5, 97.5])), rel=1e-12)


def test_point_outside_the_bootstrap_distribution_falls_back_to_the_percentile_interval():
    replicates = np.linspace(1.0, 2.0, 101)
    jack = np.random.default_rng(3).normal(size=10)
    assert bca_interval(0.5, replicates, jack) == pytest.approx(tuple(np.percentile(replicates, [2.5, 97.5])))


def test_jackknife_rows_leave_out_each_image_once_in_batches():
    rows = np.vstack(list(jackknife_rows(5, batch=2)))
    assert np.array_equal(rows, 1 - np.eye(5))
    labels, proba = calibrated_predictions(7, seed=6)
    batched = jackknife(lambda w: weighted_metrics(labels, proba, w, BINARY), len(labels))
    by_hand = [weighted_metrics(np.delete(labels, i), np.delete(proba, i, axis=0), np.ones((1, 6)), BINARY)
               ["ece"][0] for i in range(7)]
    assert batched["ece"] == pytest.approx(by_hand)
