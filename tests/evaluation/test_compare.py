"""Paired comparisons: verdicts of the paired bootstrap, McNemar, and the prediction files."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from medpipe.errors import UserError
from medpipe.evaluation import compare as cmp

N_CLASSES = 3
CLASS_NAMES = ("benign", "malignant", "normal")


def labelled_images(n: int = 200) -> np.ndarray:
    """Class indices 0, 1, 2, 0, 1, 2, ... for ``n`` test images."""
    return np.arange(n) % N_CLASSES


def proba_correct_on(labels: np.ndarray, correct: np.ndarray, confidence: float = 0.8) -> np.ndarray:
    """(N, C) probabilities: ``confidence`` on the true class where ``correct``, else on the next class."""
    predicted = np.where(correct, labels, (labels + 1) % N_CLASSES)
    proba = np.full((len(labels), N_CLASSES), (1 - confidence) / (N_CLASSES - 1))
    proba[np.arange(len(labels)), predicted] = confidence
    return proba


def right_on(n_right: int, n: int = 200) -> np.ndarray:
    """Right on the first ``n_right`` images (labels cycle, so every class gets its share)."""
    return np.arange(n) < n_right


def classifier(
    labels: np.ndarray, *correct_per_seed: np.ndarray, images: np.ndarray | None = None
) -> cmp.Predictions:
    """Classifier predictions with one seed per correctness mask."""
    n = len(labels)
    return cmp.Predictions(
        kind=cmp.CLASSIFIER, seeds=tuple(range(len(correct_per_seed))),
        images=np.arange(n) if images is None else images, sources=tuple(f"img{i}.png" for i in range(n)),
        labels=labels, class_names=CLASS_NAMES,
        proba=np.stack([proba_correct_on(labels, c) for c in correct_per_seed]),
    )


def segmenter(dice: np.ndarray, hd95: np.ndarray) -> cmp.Predictions:
    """Segmenter predictions from (S, N) Dice and HD95 (IoU derived from Dice)."""
    n = dice.shape[1]
    return cmp.Predictions(kind=cmp.SEGMENTER, seeds=tuple(range(len(dice))), images=np.arange(n),
                           sources=tuple(f"img{i}.png" for i in range(n)),
                           scores={"dice": dice, "iou": dice / (2 - dice), "hd95": hd95})


# --------------------------------------------------------------------------- verdicts


def test_identical_predictions_are_within_noise_with_zero_difference():
    labels = labelled_images()
    rng = np.random.default_rng(1)
    proba = rng.dirichlet(np.ones(N_CLASSES), size=(2, len(labels)))
    result = cmp.paired_bootstrap(labels, proba, proba.copy(), resamples=300)
    assert set(result) == set(cmp.CLASSIFIER_METRICS)
    for c in result.values():
        assert c.difference == 0 and c.ci_low == 0 and c.ci_high == 0
        assert c.verdict == cmp.WITHIN_NOISE
        assert c.base == c.head


def test_thirty_more_right_answers_of_200_is_better_and_the_reverse_is_worse():
    labels = labelled_images()
    a, b = right_on(140), right_on(170)
    assert (a <= b).all() and b.sum() - a.sum() == 30
    proba_a, proba_b = proba_correct_on(labels, a)[None], proba_correct_on(labels, b)[None]

    forward = cmp.paired_bootstrap(labels, proba_a, proba_b, resamples=500)
    assert forward["accuracy"].base == pytest.approx(0.70) and forward["accuracy"].head == pytest.approx(0.85)
    assert forward["accuracy"].difference == pytest.approx(0.15)
    assert 0 < forward["accuracy"].ci_low < 0.15 < forward["accuracy"].ci_high
    assert forward["accuracy"].verdict == cmp.BETTER
    assert forward["balanced_accuracy"].verdict == cmp.BETTER
    assert forward["accuracy"].p_value == pytest.approx(2 * 0.5**30)

    backward = cmp.paired_bootstrap(labels, proba_b, proba_a, resamples=500)
    assert backward["accuracy"].difference == pytest.approx(-0.15)
    assert backward["accuracy"].verdict == cmp.WORSE
    assert backward["balanced_accuracy"].verdict == cmp.WORSE


def test_two_more_right_answers_of_200_are_within_noise():
    labels = labelled_images()
    result = cmp.paired_bootstrap(labels, proba_correct_on(labels, right_on(140))[None],
                                  proba_correct_on(labels, right_on(142))[None], ["accuracy"], resamples=500)
    assert result["accuracy"].difference == pytest.approx(0.01)
    assert result["accuracy"].ci_low <= 0 < result["accuracy"].ci_high
    assert result["accuracy"].verdict == cmp.WITHIN_NOISE


def test_lower_is_better_metric_is_mirrored():
    labels = labelled_images()
    correct = right_on(140)
    overconfident = np.stack([proba_correct_on(labels, correct, confidence=0.99)])
    calibrated = np.stack([proba_correct_on(labels, correct, confidence=0.70)])
    result = cmp.paired_bootstrap(labels, overconfident, calibrated, ["ece", "accuracy"], resamples=500)
    assert result["ece"].lower_is_better and not result["accuracy"].lower_is_better
    assert result["ece"].difference < 0 and result["ece"].ci_high < 0
    assert result["ece"].verdict == cmp.BETTER  # lower ECE: the head improved
    reverse = cmp.paired_bootstrap(labels, calibrated, overconfident, ["ece"], resamples=500)
    assert reverse["ece"].verdict == cmp.WORSE
    assert result["accuracy"].verdict == cmp.WITHIN_NOISE  # same predictions, only the confidence changed


@pytest.mark.parametrize(("low", "high", "lower", "expected"), [
    (0.01, 0.05, False, cmp.BETTER), (-0.05, -0.01, False, cmp.WORSE), (-0.01, 0.01, False, cmp.WITHIN_NOISE),
    (0.01, 0.05, True, cmp.WORSE), (-0.05, -0.01, True, cmp.BETTER), (0.0, 0.0, True, cmp.WITHIN_NOISE),
    (float("nan"), float("nan"), False, cmp.WITHIN_NOISE),
])
def test_verdict_rule(low, high, lower, expected):
    assert cmp.verdict(low, high, lower) == expected


def test_metrics_are_averaged_over_seeds():
    labels = labelled_images()
    base = classifier(labels, right_on(140), right_on(140))
    head = classifier(labels, right_on(140), np.ones(len(labels), bool))  # seed 2 is perfect
    result = cmp.compare(base, head, ["accuracy"], resamples=200)
    assert result["accuracy"].base == pytest.approx(0.70)
    assert result["accuracy"].head == pytest.approx((0.70 + 1.0) / 2)
    assert result["accuracy"].p_value is None  # McNemar only for single-seed pairs
    assert cmp.point_estimates(head, ["accuracy"]) == {"accuracy": pytest.approx(0.85)}


def test_mcnemar_exact_binomial_on_discordant_pairs():
    a = np.array([True] * 50 + [False] * 10 + [True] * 1)
    b = np.array([True] * 50 + [True] * 10 + [False] * 1)  # 10 images only b gets right, 1 only a
    assert cmp.mcnemar(a, b) == pytest.approx(2 * (1 + 11) / 2**11)
    assert cmp.mcnemar(a, b) == pytest.approx(cmp.mcnemar(b, a))
    assert cmp.mcnemar(a, a) == 1.0
    with pytest.raises(cmp.CompareError):
        cmp.mcnemar(a, b[:-1])


def test_segmenter_scores_mean_over_images_ignore_nan_and_mirror_hd95():
    rng = np.random.default_rng(2)
    dice = rng.uniform(0.5, 0.8, size=(2, 60))
    hd95 = rng.uniform(10, 20, size=(2, 60))
    hd95[:, :5] = np.nan  # undefined (empty prediction): left out, never scored
    result = cmp.paired_bootstrap_scores({"dice": dice, "hd95": hd95}, {"dice": dice + 0.1, "hd95": hd95 - 5},
                                         resamples=300)
    assert result["dice"].difference == pytest.approx(0.1) and result["dice"].verdict == cmp.BETTER
    assert result["hd95"].base == pytest.approx(np.nanmean(hd95))
    assert result["hd95"].difference == pytest.approx(-5) and result["hd95"].verdict == cmp.BETTER
    same = cmp.paired_bootstrap_scores({"dice": dice}, {"dice": dice.copy()}, resamples=100)
    assert same["dice"].difference == 0 and same["dice"].verdict == cmp.WITHIN_NOISE


def test_ties_with_champion():
    labels = labelled_images()
    models = {
        "champ": classifier(labels, right_on(170)),
        "twin": classifier(labels, right_on(169)),
        "weak": classifier(labels, right_on(120)),
    }
    assert cmp.ties_with("champ", models, resamples=300) == {"twin": cmp.WITHIN_NOISE, "weak": cmp.WORSE}
    with pytest.raises(cmp.CompareError, match="no predictions"):
        cmp.ties_with("absent", models)


def test_compare_refuses_different_test_images_and_bad_settings():
    labels = labelled_images(30)
    base = classifier(labels, right_on(20, 30))
    other = classifier(labels, right_on(20, 30), images=np.arange(1, 31))
    assert not cmp.same_test_split(base, other)
    with pytest.raises(UserError, match="different test images"):
        cmp.compare(base, other)
    with pytest.raises(UserError, match="resamples"):
        cmp.compare(base, base, resamples=0)
    with pytest.raises(UserError, match="unknown metric"):
        cmp.compare(base, base, ["accuracy", "no_such_metric"], resamples=10)


# --------------------------------------------------------------------------- prediction files


def test_classifier_file_round_trip_sorts_seeds_and_aligns_images(tmp_path):
    labels = labelled_images(12)
    original = classifier(labels, right_on(8, 12), right_on(10, 12))
    text = cmp.to_csv(original)
    header, *rows = text.splitlines()
    assert header == "seed,image,source,label,predicted,p_benign,p_malignant,p_normal"
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    path = tmp_path / "cnn.csv"
    path.write_text("\n".join([header, *shuffled]) + "\n")

    loaded = cmp.load_predictions(path)
    assert loaded.kind == cmp.CLASSIFIER and loaded.seeds == (0, 1)
    assert loaded.class_names == CLASS_NAMES
    np.testing.assert_array_equal(loaded.images, np.arange(12))
    np.testing.assert_array_equal(loaded.labels, labels)
    np.testing.assert_allclose(loaded.proba, original.proba)
    assert loaded.sources == original.sources
    assert cmp.same_test_split(loaded, cmp.load_predictions(text))


def test_segmenter_file_round_trip_keeps_undefined_hd95():
    dice = np.array([[0.5, 0.75, 0.9]])
    hd95 = np.array([[3.0, np.nan, 1.5]])
    loaded = cmp.load_predictions(cmp.to_csv(segmenter(dice, hd95)))
    assert loaded.kind == cmp.SEGMENTER and loaded.labels is None
    np.testing.assert_allclose(loaded.scores["dice"], dice)
    np.testing.assert_allclose(loaded.scores["hd95"], hd95)  # NaN where the cell is empty


def test_misaligned_seeds_are_an_error_naming_the_file(tmp_path):
    path = tmp_path / "unet.csv"
    path.write_text("seed,image,source,dice,iou,hd95\n0,0,a.png,0.5,0.3,4\n0,1,b.png,0.6,0.4,\n"
                    "1,0,a.png,0.5,0.3,4\n1,2,c.png,0.6,0.4,3\n")
    with pytest.raises(UserError, match=r"unet\.csv: seeds 0 and 1 do not cover the same test images"):
        cmp.load_predictions(path)


@pytest.mark.parametrize(("text", "message"), [
    ("seed,image,source,foo\n0,0,a.png,1\n", "neither a classifier"),
    ("seed,image,source,label,predicted,p_x,p_y\n0,0,a.png,z,x,0.4,0.6\n", "labels \\['z'\\]"),
    ("seed,image,source,label,predicted,p_x,p_y\n" + "0,0,a.png,x,x,0.4,0.6\n" * 2, "appears twice"),
    ("seed,image,source,dice,iou,hd95\n0,zero,a.png,0.5,0.3,4\n", "image = 'zero' is not a number"),
])
def test_malformed_files_are_clear_errors(text, message):
    with pytest.raises(cmp.CompareError, match=message):
        cmp.load_predictions(text, name="reports/predictions/m.csv")


def test_shared_test_images_pair_two_splits_on_the_images_both_hold_out():
    labels = labelled_images(30)
    base = classifier(labels, right_on(20, 30), right_on(25, 30))
    # the head's split lost images 0-9, gained ten others and lists its images in another order
    order = np.arange(29, 9, -1)
    head = classifier(labels, right_on(30, 30), right_on(30, 30)).subset(order, images=np.arange(20))
    gained = replace(classifier(labels[:10], right_on(0, 10), right_on(0, 10)),
                     sources=tuple(f"new{i}.png" for i in range(10)), images=np.arange(20, 30))
    head = replace(head, sources=head.sources + gained.sources, images=np.r_[head.images, gained.images],
                   labels=np.r_[head.labels, gained.labels], proba=np.concatenate([head.proba, gained.proba], 1))
    assert not cmp.same_test_split(base, head)

    base_shared, head_shared = cmp.shared_test_images(base, head)

    assert base_shared.sources == head_shared.sources == tuple(f"img{i}.png" for i in range(10, 30))
    assert cmp.same_test_split(base_shared, head_shared)
    np.testing.assert_array_equal(head_shared.proba, classifier(labels, right_on(30, 30), right_on(30, 30))
                                  .proba[:, 10:])
    result = cmp.compare(base_shared, head_shared, ["accuracy"], resamples=200)
    assert result["accuracy"].base == pytest.approx((10 + 15) / 2 / 20)  # seeds right on 10 and 15 of 20
    assert result["accuracy"].head == 1.0


def test_shared_test_images_match_source_and_label_and_refuse_ambiguous_sources():
    labels = labelled_images(6)
    base = classifier(labels, right_on(6, 6))
    relabelled = replace(base, labels=(labels + 1) % N_CLASSES)
    assert len(cmp.shared_test_images(base, relabelled)[0].images) == 0  # same files, other labels
    twice = replace(base, sources=("a.png",) * 6)
    with pytest.raises(UserError, match="'a.png' appears twice"):
        cmp.shared_test_images(twice, base)
    with pytest.raises(UserError, match="classifier with a segmenter"):
        cmp.shared_test_images(base, segmenter(np.ones((1, 6)), np.ones((1, 6))))
