"""Paired comparison of two models on the same test images: every comparison ends in a verdict.

Two models scored on the *same* images are compared by a paired bootstrap: each resample draws one
weight row over the images (multinomial counts, as in :mod:`medpipe.evaluation.scores`) shared by
both models and all their training seeds; each metric is computed per seed, averaged over the seeds,
and the difference head (b) minus base (a) is kept. The BCa interval of that difference (bias-corrected
and accelerated, :func:`medpipe.evaluation.scores.bca_interval`; the acceleration from the jackknife that
leaves one image out of both models and all seeds at once) gives the verdict. BCa, not the percentile
interval, because differences of skewed metrics (ECE, HD95) are skewed and biased under resampling too:
the percentile interval then sits lopsided around the observed difference, and a verdict read from it
can turn on that bias rather than on the data. The resamples are the same as a percentile interval's
(same seed, same weight rows); only the levels at which the endpoints are read move.

- ``better``: the interval lies entirely on the improving side of 0 (above for higher-is-better
  metrics, below for lower-is-better ones such as ECE or HD95);
- ``worse``: entirely on the other side;
- ``within noise``: the interval contains 0 (identical predictions give a zero-width interval at 0).

Pairing removes the image-to-image difficulty that both models share, so it detects differences that
two separate intervals (one per model) would call overlapping. For accuracy of single-seed pairs the
exact McNemar test on the discordant images is reported as well.

Predictions come from the ``evaluate`` stage, one CSV per model (``reports/predictions/<model>.csv``),
long format with one block of rows per training seed:

- classifiers: ``seed,image,source,label,predicted,p_<class>...`` (class names in class order);
- segmenters: ``seed,image,source,dice,iou,hd95`` (lesion images only; an empty hd95 is undefined).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import stats

from medpipe.errors import UserError
from medpipe.evaluation.scores import LOWER_IS_BETTER, bca_interval, jackknife, weighted_metrics

OUT_OF_FOLD_DIR = "out_of_fold"   # reports/predictions/out_of_fold/<model>.csv: cross-validation's predictions
NOT_TRAINED_FILE = "not_trained.json"   # reports/predictions/not_trained.json: {model: why it has no predictions}
CLASSIFIER = "classifier"
SEGMENTER = "segmenter"
CLASSIFIER_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "ece")
SEGMENTER_METRICS = ("dice", "iou", "hd95")
SEGMENTER_LOWER_IS_BETTER = frozenset({"hd95"})
HEADLINE_METRICS = {CLASSIFIER: CLASSIFIER_METRICS, SEGMENTER: SEGMENTER_METRICS}
BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"
PROBA_PREFIX = "p_"
_KEY_COLUMNS = ("seed", "image", "source")
_CLASSIFIER_COLUMNS = (*_KEY_COLUMNS, "label", "predicted")
_SEGMENTER_COLUMNS = (*_KEY_COLUMNS, *SEGMENTER_METRICS)


class CompareError(UserError, ValueError):
    """Predictions that cannot be compared: malformed file, misaligned images, unknown metric, ..."""


@dataclass(frozen=True)
class Comparison:
    """Head (b) against base (a) on one metric: point values, the paired interval of b - a, the verdict."""

    metric: str
    base: float
    head: float
    difference: float
    ci_low: float
    ci_high: float
    verdict: str
    lower_is_better: bool = False
    p_value: float | None = None  # exact McNemar test (accuracy of single-seed pairs only)


@dataclass(frozen=True, eq=False)
class Predictions:
    """One model's test-split predictions, images in ascending ``image`` order, seeds ascending.

    Classifiers fill ``labels`` (class indices, (N,)), ``class_names`` and ``proba`` (S, N, C);
    segmenters fill ``scores`` (metric name -> (S, N) per-image scores, NaN where undefined).
    """

    kind: str
    seeds: tuple[int, ...]
    images: np.ndarray
    sources: tuple[str, ...]
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    proba: np.ndarray | None = None
    scores: Mapping[str, np.ndarray] = field(default_factory=dict)

    def test_key(self) -> tuple[tuple, ...]:
        """What identifies the test split: (image, source, label) of each image; label None for segmenters."""
        return tuple((image, *key) for image, key in zip(self.images.tolist(), self.image_keys(), strict=True))

    def image_keys(self) -> list[tuple[str, str | None]]:
        """(source, label name) of each image: what identifies an image across two test splits."""
        labels = ([self.class_names[i] for i in self.labels] if self.labels is not None
                  else [None] * len(self.sources))
        return list(zip(self.sources, labels, strict=True))

    def subset(self, index: Sequence[int], images: np.ndarray | None = None) -> Predictions:
        """These predictions on the images at positions ``index`` (numbered ``images`` if given)."""
        index = np.asarray(index, dtype=np.int64)
        return replace(
            self, images=self.images[index] if images is None else np.asarray(images, dtype=np.int64),
            sources=tuple(self.sources[i] for i in index),
            labels=None if self.labels is None else self.labels[index],
            proba=None if self.proba is None else self.proba[:, index],
            scores={name: values[:, index] for name, values in self.scores.items()},
        )


# --------------------------------------------------------------------------- verdicts and intervals


def verdict(ci_low: float, ci_high: float, lower_is_better: bool = False) -> str:
    """``better`` / ``worse`` if the interval of (head - base) excludes 0, else ``within noise``."""
    if np.isnan(ci_low) or np.isnan(ci_high):
        return WITHIN_NOISE
    above, below = ci_low > 0, ci_high < 0
    if lower_is_better:
        above, below = below, above
    return BETTER if above else WORSE if below else WITHIN_NOISE


def _check_settings(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise CompareError(f"resamples must be at least 1, got {resamples}")
    if not 0 < confidence < 1:
        raise CompareError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _weight_rows(n_images: int, resamples: int, seed: int) -> np.ndarray:
    """(1 + resamples, N): a row of ones (the point estimate), then multinomial bootstrap counts."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=resamples)
    return np.vstack([np.ones((1, n_images)), counts]).astype(np.float64)


def _summarise(
    metric: str, a: np.ndarray, b: np.ndarray, jack_a: np.ndarray, jack_b: np.ndarray, confidence: float,
    lower_is_better: bool,
) -> Comparison:
    """A :class:`Comparison` from per-row values of both models (row 0: point estimate, then resamples).

    ``jack_a`` / ``jack_b``: each model's value with image i left out (the same image on both sides),
    the jackknife of the difference for the BCa acceleration. Resamples (and jackknife values) where the
    metric is undefined for either model are left out of the interval; a difference constant over the
    resamples (identical predictions) gets the point as its interval.
    """
    low, high = bca_interval(b[0] - a[0], (b - a)[1:], jack_b - jack_a, confidence)
    return Comparison(
        metric=metric, base=float(a[0]), head=float(b[0]), difference=float(b[0] - a[0]),
        ci_low=float(low), ci_high=float(high), verdict=verdict(low, high, lower_is_better),
        lower_is_better=lower_is_better,
    )


def _paired(
    rows_a: Callable[[np.ndarray], dict[str, np.ndarray]],
    rows_b: Callable[[np.ndarray], dict[str, np.ndarray]],
    n_images: int, metrics: Sequence[str], lower_is_better: frozenset[str],
    resamples: int, seed: int, confidence: float,
) -> dict[str, Comparison]:
    """The paired bootstrap: ``rows_a`` / ``rows_b`` map weight rows (R, N) to {metric: (R,) values}.

    One set of weight rows (the point, then the seeded resamples) and one leave-one-out jackknife
    serve both models, so every interval is of the paired difference.
    """
    _check_settings(resamples, confidence)
    if n_images == 0:
        raise CompareError("cannot compare models on an empty test split")
    weights = _weight_rows(n_images, resamples, seed)
    values_a, values_b = rows_a(weights), rows_b(weights)
    unknown = sorted(set(metrics) - set(values_a))
    if unknown:
        raise CompareError(f"unknown metric(s) {unknown}; known: {sorted(values_a)}")
    jack_a, jack_b = jackknife(rows_a, n_images), jackknife(rows_b, n_images)
    return {m: _summarise(m, values_a[m], values_b[m], jack_a[m], jack_b[m], confidence, m in lower_is_better)
            for m in metrics}


def _seed_mean(per_seed: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Average each metric's (R,) rows over the seeds (NaN if undefined for any seed)."""
    return {key: np.mean([values[key] for values in per_seed], axis=0) for key in per_seed[0]}


def _classifier_rows(labels: np.ndarray, proba: np.ndarray,
                     ece_bins: int = 15) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    names = [str(c) for c in range(proba.shape[2])]
    return lambda weights: _seed_mean([weighted_metrics(labels, p, weights, names, ece_bins) for p in proba])


def _check_seed_arrays(name: str, array: np.ndarray, ndim: int, n_images: int) -> None:
    if array.ndim != ndim or array.shape[0] == 0 or array.shape[1] != n_images:
        raise CompareError(
            f"{name} has shape {array.shape}; expected {ndim} axes (seeds, {n_images} images, ...)"
        )


def paired_bootstrap(
    labels: np.ndarray, proba_a: np.ndarray, proba_b: np.ndarray,
    metrics: Sequence[str] = CLASSIFIER_METRICS, resamples: int = 1000, seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Comparison]:
    """Classifier b (head) against a (base) on the same images: {metric: :class:`Comparison`}.

    ``labels``: (N,) class indices; ``proba_a`` (S_a, N, C), ``proba_b`` (S_b, N, C): class
    probabilities of each training seed, the same N images in the same order. Any metric of
    :func:`medpipe.evaluation.scores.weighted_metrics` may be named. Accuracy of a single-seed pair
    also carries the exact McNemar p-value.
    """
    labels = np.asarray(labels, dtype=np.int64)
    proba_a, proba_b = np.asarray(proba_a, dtype=np.float64), np.asarray(proba_b, dtype=np.float64)
    for name, proba in (("proba_a", proba_a), ("proba_b", proba_b)):
        _check_seed_arrays(name, proba, 3, len(labels))
    if proba_a.shape[2] != proba_b.shape[2]:
        raise CompareError(f"the models have {proba_a.shape[2]} and {proba_b.shape[2]} classes")
    result = _paired(_classifier_rows(labels, proba_a), _classifier_rows(labels, proba_b), len(labels),
                     metrics, LOWER_IS_BETTER, resamples, seed, confidence)
    if "accuracy" in result and len(proba_a) == len(proba_b) == 1:
        p_value = mcnemar(proba_a[0].argmax(axis=1) == labels, proba_b[0].argmax(axis=1) == labels)
        result["accuracy"] = replace(result["accuracy"], p_value=p_value)
    return result


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value: binomial test of the discordant images (1.0 when there are none)."""
    correct_a, correct_b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise CompareError(f"correctness arrays differ in shape: {correct_a.shape} vs {correct_b.shape}")
    only_a = int((correct_a & ~correct_b).sum())
    only_b = int((~correct_a & correct_b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_b, only_a + only_b, 0.5).pvalue)


def _weighted_nanmean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R,) seed-averaged weighted means of (S, N) per-image ``values``, ignoring NaN images."""
    defined = np.isfinite(values)
    total = weights @ np.where(defined, values, 0.0).T  # (R, S)
    count = weights @ defined.T.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = np.where(count > 0, total / np.where(count > 0, count, 1.0), np.nan)
    return means.mean(axis=1)


def _score_rows(scores: Mapping[str, np.ndarray]) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    return lambda weights: {name: _weighted_nanmean(values, weights) for name, values in scores.items()}


def paired_bootstrap_scores(
    scores_a: Mapping[str, np.ndarray], scores_b: Mapping[str, np.ndarray],
    metrics: Sequence[str] | None = None, resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
    lower_is_better: frozenset[str] = SEGMENTER_LOWER_IS_BETTER,
) -> dict[str, Comparison]:
    """Per-image scores (e.g. Dice, HD95) of b (head) against a (base): {metric: :class:`Comparison`}.

    ``scores_a`` / ``scores_b``: metric name -> (S, N) per-image scores of each training seed, the
    same N images in the same order; a metric is the mean over images (NaN images left out), averaged
    over seeds. ``metrics`` defaults to the names both sides have.
    """
    arrays_a = {k: np.asarray(v, dtype=np.float64) for k, v in scores_a.items()}
    arrays_b = {k: np.asarray(v, dtype=np.float64) for k, v in scores_b.items()}
    metrics = list(metrics) if metrics is not None else sorted(set(arrays_a) & set(arrays_b))
    missing = sorted({m for m in metrics if m not in arrays_a or m not in arrays_b})
    if missing or not metrics:
        raise CompareError(f"per-image scores missing on one side: {missing or 'no common metric'}")
    n_images = arrays_a[metrics[0]].shape[-1]
    for side, arrays in (("scores_a", arrays_a), ("scores_b", arrays_b)):
        for m in metrics:
            _check_seed_arrays(f"{side}[{m!r}]", arrays[m], 2, n_images)
    rows_a = _score_rows({m: arrays_a[m] for m in metrics})
    rows_b = _score_rows({m: arrays_b[m] for m in metrics})
    return _paired(rows_a, rows_b, n_images, metrics, lower_is_better, resamples, seed, confidence)


# --------------------------------------------------------------------------- whole prediction sets


def _require_same_kind(base: Predictions, head: Predictions) -> None:
    if base.kind != head.kind:
        raise CompareError(f"cannot compare a {base.kind} with a {head.kind}")


def same_test_split(base: Predictions, head: Predictions) -> bool:
    """Whether both were scored on identical test images (same image, source and label, same order)."""
    same_kind = base.kind == head.kind and base.class_names == head.class_names
    return same_kind and base.test_key() == head.test_key()


def shared_test_images(base: Predictions, head: Predictions) -> tuple[Predictions, Predictions]:
    """Both prediction sets on the test images they share (same source and label), in ``base``'s order.

    When a change moved the split (another image size, another near-duplicate distance, more data), the
    images that both revisions held out are still a fair paired comparison: neither model trained on
    them. ``head``'s subset takes ``base``'s image numbers, so the two subsets form one test split.
    """
    _require_same_kind(base, head)
    if base.class_names != head.class_names:
        raise CompareError(f"the models have classes {list(base.class_names)} and {list(head.class_names)}")
    base_keys, head_keys = base.image_keys(), head.image_keys()
    for side, keys in (("base", base_keys), ("head", head_keys)):
        twice = [key for key, count in Counter(keys).items() if count > 1]
        if twice:
            raise CompareError(f"{side}: test image {twice[0][0]!r} appears twice: images cannot be matched by source")
    head_position = {key: i for i, key in enumerate(head_keys)}
    in_base = [i for i, key in enumerate(base_keys) if key in head_position]
    in_head = [head_position[base_keys[i]] for i in in_base]
    return base.subset(in_base), head.subset(in_head, images=base.images[in_base])


def compare(
    base: Predictions, head: Predictions, metrics: Sequence[str] | None = None,
    resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
) -> dict[str, Comparison]:
    """Paired verdicts of ``head`` against ``base`` (``metrics`` default: their kind's headline metrics)."""
    _require_same_kind(base, head)
    if not same_test_split(base, head):
        raise CompareError("the prediction sets cover different test images: no paired comparison possible")
    metrics = tuple(metrics or HEADLINE_METRICS[base.kind])
    if base.kind == CLASSIFIER:
        return paired_bootstrap(base.labels, base.proba, head.proba, metrics, resamples, seed, confidence)
    return paired_bootstrap_scores(base.scores, head.scores, metrics, resamples, seed, confidence)


def _metric_rows(predictions: Predictions, ece_bins: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Weight rows (R, N) -> {metric: (R,) seed-averaged values} of one prediction set."""
    if predictions.kind == CLASSIFIER:
        return _classifier_rows(predictions.labels, predictions.proba, ece_bins)
    return _score_rows(predictions.scores)


def _known(metrics: Sequence[str], values: Mapping[str, np.ndarray]) -> None:
    unknown = sorted(set(metrics) - set(values))
    if unknown:
        raise CompareError(f"unknown metric(s) {unknown}; known: {sorted(values)}")


def point_estimates(predictions: Predictions, metrics: Sequence[str] | None = None,
                    ece_bins: int = 15) -> dict[str, float]:
    """Seed-averaged metric values on the whole test split (no interval): {metric: value}."""
    metrics = tuple(metrics or HEADLINE_METRICS[predictions.kind])
    rows = _metric_rows(predictions, ece_bins)(np.ones((1, len(predictions.images))))
    _known(metrics, rows)
    return {m: float(rows[m][0]) for m in metrics}


def intervals(predictions: Predictions, metrics: Sequence[str] | None = None, resamples: int = 1000,
              seed: int = 0, confidence: float = 0.95, ece_bins: int = 15) -> dict[str, float | None]:
    """Seed-averaged metrics with their BCa bootstrap interval over the images:
    ``{metric: value, metric_ci_low: ..., metric_ci_high: ...}`` (None where undefined)."""
    _check_settings(resamples, confidence)
    metrics = tuple(metrics or HEADLINE_METRICS[predictions.kind])
    rows, n_images = _metric_rows(predictions, ece_bins), len(predictions.images)
    values = rows(_weight_rows(n_images, resamples, seed))
    _known(metrics, values)
    jack = jackknife(rows, n_images)
    out: dict[str, float | None] = {}
    for m in metrics:
        low, high = bca_interval(values[m][0], values[m][1:], jack[m], confidence)
        out |= {m: values[m][0], f"{m}_ci_low": low, f"{m}_ci_high": high}
    return {k: None if v is None or not np.isfinite(v) else round(float(v), 6) for k, v in out.items()}


def ties_with(
    champion_name: str, predictions_by_model: Mapping[str, Predictions], metric: str | None = None,
    resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
) -> dict[str, str]:
    """{model: verdict of that model against the champion} for every other model of one revision.

    ``within noise`` marks a statistical tie with the champion. ``metric`` defaults to balanced
    accuracy for classifiers and Dice for segmenters.
    """
    if champion_name not in predictions_by_model:
        known = sorted(predictions_by_model)
        raise CompareError(f"champion {champion_name!r} has no predictions; models: {known}")
    champion = predictions_by_model[champion_name]
    metric = metric or {CLASSIFIER: "balanced_accuracy", SEGMENTER: "dice"}[champion.kind]
    return {
        name: compare(champion, other, [metric], resamples, seed, confidence)[metric].verdict
        for name, other in sorted(predictions_by_model.items()) if name != champion_name
    }


# --------------------------------------------------------------------------- prediction files


def _read_rows(path_or_text: str | Path, name: str | None) -> tuple[str, list[str], list[dict[str, str]]]:
    """(name for messages, header, rows) of a prediction CSV given as a path or as its text."""
    if isinstance(path_or_text, Path) or "\n" not in path_or_text:
        path = Path(path_or_text)
        if not path.is_file():
            raise CompareError(f"{path}: no such prediction file")
        text, name = path.read_text(), name or str(path)
    else:
        text, name = path_or_text, name or "<predictions>"
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    if not reader.fieldnames or not rows:
        raise CompareError(f"{name}: empty prediction file")
    return name, list(reader.fieldnames), rows


def _kind(name: str, header: Sequence[str]) -> str:
    has_proba = any(c.startswith(PROBA_PREFIX) for c in header)
    if has_proba and set(_CLASSIFIER_COLUMNS) <= set(header):
        return CLASSIFIER
    if set(_SEGMENTER_COLUMNS) <= set(header):
        return SEGMENTER
    raise CompareError(
        f"{name}: columns {list(header)} are neither a classifier's "
        f"({','.join(_CLASSIFIER_COLUMNS)},p_<class>...) "
        f"nor a segmenter's ({','.join(_SEGMENTER_COLUMNS)})"
    )


def _number(name: str, line: int, column: str, text: str, kind: type) -> float | int:
    if kind is float and text.strip() == "":
        return float("nan")
    try:
        return kind(text)
    except ValueError:
        raise CompareError(f"{name}, row {line}: {column} = {text!r} is not a number") from None


def _aligned_blocks(name: str, rows: list[dict[str, str]]) -> tuple[list[int], list[int], dict[int, dict]]:
    """Seeds and images (ascending) and {seed: {image: row}}; every seed must cover the same images."""
    blocks: dict[int, dict[int, dict[str, str]]] = {}
    for line, row in enumerate(rows, start=2):
        seed = _number(name, line, "seed", row["seed"], int)
        image = _number(name, line, "image", row["image"], int)
        block = blocks.setdefault(seed, {})
        if image in block:
            raise CompareError(f"{name}, row {line}: image {image} appears twice for seed {seed}")
        block[image] = {**row, "_line": line}
    seeds = sorted(blocks)
    images = sorted(blocks[seeds[0]])
    for s in seeds[1:]:
        if sorted(blocks[s]) != images:
            diff = sorted(set(blocks[s]) ^ set(images))
            raise CompareError(f"{name}: seeds {seeds[0]} and {s} do not cover the same test images "
                               f"(e.g. image {diff[:5]})")
    return seeds, images, blocks


def _consistent(name: str, column: str, seeds: list[int], images: list[int], blocks: dict) -> tuple[str, ...]:
    """The per-image value of ``column``, which every seed must agree on."""
    values = tuple(blocks[seeds[0]][i][column] for i in images)
    for s in seeds[1:]:
        for i, value in zip(images, values, strict=True):
            if blocks[s][i][column] != value:
                raise CompareError(f"{name}: image {i} has {column} {value!r} for seed {seeds[0]} "
                                   f"but {blocks[s][i][column]!r} for seed {s}")
    return values


def _column_array(name: str, column: str, seeds: list[int], images: list[int], blocks: dict) -> np.ndarray:
    """(S, N) floats of ``column``; empty cells are NaN."""
    def value(s: int, i: int) -> float:
        return _number(name, blocks[s][i]["_line"], column, blocks[s][i][column], float)

    return np.array([[value(s, i) for i in images] for s in seeds], dtype=np.float64)


def load_predictions(path_or_text: str | Path, name: str | None = None) -> Predictions:
    """Parse a classifier's or a segmenter's prediction CSV (a path, or the file's text) into arrays.

    Seeds are sorted and images aligned by their ``image`` index; ``name`` labels error messages
    (default: the path). Raises :class:`CompareError` naming the file when the seeds do not cover the
    same images, or an image's source or label differs between seeds.
    """
    name, header, rows = _read_rows(path_or_text, name)
    kind = _kind(name, header)
    seeds, images, blocks = _aligned_blocks(name, rows)
    common = {"kind": kind, "seeds": tuple(seeds), "images": np.array(images, dtype=np.int64),
              "sources": _consistent(name, "source", seeds, images, blocks)}
    if kind == SEGMENTER:
        scores = {m: _column_array(name, m, seeds, images, blocks) for m in SEGMENTER_METRICS}
        return Predictions(**common, scores=scores)
    proba_columns = [c for c in header if c.startswith(PROBA_PREFIX)]
    class_names = tuple(c[len(PROBA_PREFIX):] for c in proba_columns)
    label_names = _consistent(name, "label", seeds, images, blocks)
    unknown = sorted(set(label_names) - set(class_names))
    if unknown:
        raise CompareError(
            f"{name}: labels {unknown} have no probability column (classes: {list(class_names)})"
        )
    labels = np.array([class_names.index(label) for label in label_names], dtype=np.int64)
    proba = np.stack([_column_array(name, c, seeds, images, blocks) for c in proba_columns], axis=-1)
    if np.isnan(proba).any():
        raise CompareError(f"{name}: empty probability cells")
    return Predictions(**common, labels=labels, class_names=class_names, proba=proba)


def to_csv(predictions: Predictions) -> str:
    """``predictions`` as CSV text in the ``evaluate`` stage's format (the inverse of loading)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if predictions.kind == CLASSIFIER:
        writer.writerow([*_CLASSIFIER_COLUMNS, *(PROBA_PREFIX + c for c in predictions.class_names)])
    else:
        writer.writerow(_SEGMENTER_COLUMNS)
    for s, seed in enumerate(predictions.seeds):
        for i, image in enumerate(predictions.images.tolist()):
            writer.writerow([seed, image, predictions.sources[i], *_row_values(predictions, s, i)])
    return out.getvalue()


def _row_values(predictions: Predictions, s: int, i: int) -> list:
    if predictions.kind == SEGMENTER:
        values = (float(predictions.scores[m][s, i]) for m in SEGMENTER_METRICS)
        return ["" if np.isnan(v) else repr(v) for v in values]
    names = predictions.class_names
    proba = predictions.proba[s, i]
    return [names[predictions.labels[i]], names[int(proba.argmax())], *(repr(float(p)) for p in proba)]
