"""The PNG figures for people: what each one shows (read from the matplotlib Figure), its colours, and that a
rerun writes the same bytes whatever the user's matplotlib settings."""

from __future__ import annotations

import re
import zlib

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_hex

from medpipe.evaluation import calibration, figures, gradcam, plots
from medpipe.evaluation.scores import weighted_metrics
from medpipe.segmentation import viz
from medpipe.segmentation.metrics import per_image_scores

CLASSES = ("benign", "malignant", "normal")
BINS = 10


@pytest.fixture(scope="module")
def scored():
    """Test labels, probabilities better than chance, and the same after temperature scaling."""
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), [19, 13, 8])
    proba = rng.dirichlet(np.ones(3), len(y))
    proba[np.arange(len(y)), y] += rng.uniform(0, 1.2, len(y))
    proba /= proba.sum(1, keepdims=True)
    temperature = calibration.fit_temperature(proba, y)
    return y, proba, calibration.apply_temperature(proba, temperature), temperature


@pytest.fixture(scope="module")
def scans():
    """Grey images with a bright square lesion (the last one has none), masks, and a shifted prediction."""
    images = np.full((4, 24, 24, 3), 40, np.uint8)
    true = np.zeros((4, 24, 24), bool)
    for i in range(3):
        true[i, 6 + i:14 + i, 5:13] = True
        images[i][true[i]] = 200
    pred = np.roll(true, 2, axis=2)
    pred[3, 1:3, 1:3] = True  # a false positive on the image without a lesion
    return images, true, pred, per_image_scores(true, pred)["dice"]


def png_text_chunks(data: bytes) -> list[bytes]:
    """The keywords of a PNG's tEXt/iTXt/zTXt chunks."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        assert zlib.crc32(kind + body) == int.from_bytes(data[at + 8 + length:at + 12 + length], "big")
        if kind in (b"tEXt", b"iTXt", b"zTXt"):
            chunks.append(body.split(b"\0")[0])
        at += 12 + length
    return chunks


def written(path) -> bytes:
    data = path.read_bytes()
    assert len(data) > 2000 and b"Software" not in png_text_chunks(data), path
    return data


# -- confusion matrix ----------------------------------------------------------------------------------
def test_confusion_cells_hold_the_count_and_the_row_rate(tmp_path, scored):
    y, proba, _, _ = scored
    predicted = proba.argmax(1)
    fig = plots.confusion_figure(tmp_path / "c.png", "knn", y, predicted, CLASSES)
    written(tmp_path / "c.png")
    shown = figures.texts(fig)
    counts = plots.confusion_counts(y, predicted, 3)
    assert counts.sum() == len(y)
    (ax, _colorbar) = fig.axes
    cells = [t.get_text() for t in ax.texts]
    assert cells == [f"{counts[i, j]}\n({counts[i, j] / counts[i].sum():.2f})" for i in range(3) for j in range(3)]
    assert all(c in shown for c in cells)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASSES)
    assert [t.get_text().split("\n")[0] for t in ax.get_yticklabels()] == list(CLASSES)
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert f"knn: confusion matrix, test split (n = {len(y)} images)" in shown


def test_confusion_rates_of_a_class_absent_from_the_split_are_a_dash():
    counts = plots.confusion_counts(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)
    assert plots.confusion_cells(counts) == [["1\n(0.50)", "1\n(0.50)", "0\n(0.00)"],
                                             ["0\n(0.00)", "1\n(1.00)", "0\n(0.00)"],
                                             ["0\n(-)", "0\n(-)", "0\n(-)"]]


def test_the_confusion_plot_data_for_dvc_is_unchanged(scored):
    y, proba, scaled, _ = scored
    rows = plots.confusion_rows(y[:2], np.array([0, 2]), CLASSES)
    assert rows == [{"actual": "benign", "predicted": "benign"}, {"actual": "benign", "predicted": "normal"}]
    calibration_rows = plots.calibration_rows(y, proba, BINS, scaled)
    assert {tuple(r) for r in calibration_rows} == {("confidence", "accuracy", "count", "calibration")}


# -- reliability ---------------------------------------------------------------------------------------
def test_reliability_shows_both_eces_and_the_images_per_bin(tmp_path, scored):
    y, proba, scaled, temperature = scored
    fig = plots.reliability_figure(tmp_path / "r.png", "cnn", y, proba, BINS, scaled, temperature)
    written(tmp_path / "r.png")
    shown = figures.texts(fig)
    legend = " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    for label, p in (("before temperature scaling", proba), (f"after temperature scaling (T = {temperature:.2f})",
                                                              scaled)):
        ece = weighted_metrics(y, p, np.ones((1, len(y))), CLASSES, ece_bins=BINS)["ece"][0]
        assert f"{label}: ECE {ece:.3f}" in legend
        assert plots.expected_calibration_error(calibration.reliability_curve(y, p, BINS)) == pytest.approx(ece)
    curve, bars = fig.axes
    assert "perfect calibration" in legend and curve.get_ylabel() == "accuracy"
    assert bars.get_xlabel() == "confidence (top-label probability)" and bars.get_ylabel() == "images per bin"
    # one labelled bar per non-empty bin and curve: the counts add up to the split twice (before and after)
    heights = [int(b.get_height()) for b in bars.patches]
    assert sum(heights) == 2 * len(y) and [str(h) for h in heights] == [t.get_text() for t in bars.texts]
    assert all(t.get_text() in shown for t in bars.texts)
    assert f"cnn: calibration, test split (n = {len(y)} images)" in shown


def test_reliability_without_temperature_scaling_has_one_curve(tmp_path, scored):
    y, proba, _, _ = scored
    fig = plots.reliability_figure(tmp_path / "r.png", "knn", y, proba, BINS)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(legend) == 2 and legend[1].startswith("model probabilities: ECE ")
    assert sum(b.get_height() for b in fig.axes[1].patches) == len(y)


def test_overview_figure_has_the_four_panels_in_plain_words(tmp_path, scored):
    y, proba, scaled, temperature = scored
    fig = plots.model_figure(tmp_path / "m.png", "cnn", y, proba, CLASSES, BINS, scaled, temperature)
    written(tmp_path / "m.png")
    shown = figures.texts(fig)
    for words in ("confusion matrix", "ROC curves", "precision-recall curves", "calibration", "predicted class",
                  "true class", "false-positive rate (1 - specificity)", "true-positive rate (sensitivity)",
                  "recall (sensitivity)", "precision (positive predictive value)", "accuracy",
                  "confidence (top-label probability)", f"cnn, test split (n = {len(y)} images)"):
        assert words in shown, words
    assert not [s for s in shown if re.search(r"_|Positive label|\bTrue\b", s)]  # no raw variable names


# -- mask contours -------------------------------------------------------------------------------------
def test_contours_are_colour_blind_safe_with_a_legend_and_the_dice_of_each_image(tmp_path, scans):
    images, true, pred, dice = scans
    fig = viz.contour_grid(tmp_path / "s.png", images, true, pred, dice, "unet, test split")
    written(tmp_path / "s.png")
    styles = {(to_hex(contour.get_edgecolor()[0]), contour.get_linestyle()[0][1] is not None)
              for ax in fig.axes for contour in ax.collections}
    assert styles == {("#0072b2", False), ("#e69f00", True)}  # truth solid blue, prediction dashed orange
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["truth (expert mask)", "prediction"]
    assert [to_hex(h.get_color()) for h in legend.legend_handles] == ["#0072b2", "#e69f00"]
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles[:3] == [f"Dice {d:.2f}" for d in dice[:3]]
    assert titles[3] == f"no lesion: Dice 0.00\npredicted lesion area {pred[3].mean():.1%}"
    assert viz.contour_grid(tmp_path / "none.png", images[:0], true[:0], pred[:0], dice[:0], "t") is None


# -- Grad-CAM ------------------------------------------------------------------------------------------
def test_gradcam_has_a_colour_bar_a_uniform_colormap_and_the_classes_in_words(tmp_path):
    images = np.full((3, 16, 16, 3), 90, np.uint8)
    maps = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)  # at the model's input size
    fig = gradcam.overlay_figure(tmp_path / "g.png", "cnn: Grad-CAM", images, maps, np.array([0, 1, 2]),
                                 np.array([0, 0, 2]), CLASSES)
    written(tmp_path / "g.png")
    shown = figures.texts(fig)
    assert shown[:6] == ["true: benign", "predicted: benign (correct)", "true: malignant",
                         "predicted: benign (WRONG)", "true: normal", "predicted: normal (correct)"]
    heat = [im for ax in fig.axes for im in ax.images if im.get_array().ndim == 2]  # not the RGB images
    assert len(heat) == 3 and {im.get_cmap().name for im in heat} == {"inferno"}
    colorbar = fig.axes[-1]
    assert "Grad-CAM relevance for the predicted class" in colorbar.get_ylabel()


# -- reproducible bytes --------------------------------------------------------------------------------
def draw_all(folder, scored, scans) -> dict[str, bytes]:
    y, proba, scaled, temperature = scored
    images, true, pred, dice = scans
    plots.confusion_figure(folder / "confusion.png", "m", y, proba.argmax(1), CLASSES)
    plots.reliability_figure(folder / "reliability.png", "m", y, proba, BINS, scaled, temperature)
    plots.model_figure(folder / "overview.png", "m", y, proba, CLASSES, BINS, scaled, temperature)
    viz.contour_grid(folder / "contours.png", images, true, pred, dice, "m")
    gradcam.overlay_figure(folder / "gradcam.png", "m", images[:2], true[:2].astype(np.float32), np.array([0, 1]),
                           np.array([0, 1]), CLASSES)
    return {p.name: written(p) for p in sorted(folder.iterdir())}


def test_two_runs_write_the_same_bytes_whatever_the_users_matplotlib_settings(tmp_path, scored, scans):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = draw_all(tmp_path / "a", scored, scans)
    assert len(first) == 5
    with matplotlib.rc_context({"font.size": 17, "image.cmap": "jet", "lines.linewidth": 4, "figure.dpi": 33,
                                "savefig.dpi": 300, "axes.prop_cycle": matplotlib.cycler(color=["red", "green"])}):
        second = draw_all(tmp_path / "b", scored, scans)
    assert second == first


def test_training_curves_of_every_model_land_in_two_long_tables(tmp_path):
    """evaluate's plots/evaluate/curves/: train and validation loss per model and seed, and the validation score
    each model's checkpoint choice watched, from the DVCLive files of the training stages."""
    import csv

    from medpipe.evaluation import curves

    def tsv(path, metric, values):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"step\t{metric}\n" + "".join(f"{i + 1}\t{v}\n" for i, v in enumerate(values)))

    live = tmp_path / "plots/train"
    tsv(live / "cnn/seed42/plots/metrics/train/loss.tsv", "loss", [1.0, 0.5])
    tsv(live / "cnn/seed42/plots/metrics/val/loss.tsv", "loss", [1.1, 0.9])
    tsv(live / "cnn/seed42/plots/metrics/val/f1_macro.tsv", "f1_macro", [0.4, 0.6])
    tsv(live / "cnn/seed42/plots/metrics/val/balanced_accuracy.tsv", "balanced_accuracy", [0.3, 0.7])
    tsv(live / "unet/seed42/plots/metrics/val/dice.tsv", "dice", [0.2, 0.5])
    params = {"train": {"monitor": "balanced_accuracy"}, "models": {"cnn": {"train": {"monitor": "f1_macro"}}}}
    watched = curves.monitors(params, ["cnn"], ["unet"])
    assert watched == {"cnn": "f1_macro", "unet": "dice"}
    found = curves.write_curves([("cnn", 42, live / "cnn/seed42"), ("unet", 42, live / "unet/seed42"),
                                 ("resnet", 42, live / "resnet/seed42")], watched, tmp_path / "out")
    assert found == 2  # resnet has no curves: left out
    loss = list(csv.DictReader((tmp_path / "out/loss.csv").open()))
    assert [(r["model"], r["step"], r["split"], r["loss"]) for r in loss] == [
        ("cnn", "1", "train", "1.0"), ("cnn", "1", "validation", "1.1"),
        ("cnn", "2", "train", "0.5"), ("cnn", "2", "validation", "0.9")]
    validation = list(csv.DictReader((tmp_path / "out/validation.csv").open()))
    assert {(r["model"], r["metric"]) for r in validation} == {("cnn", "f1_macro"), ("unet", "dice")}
    assert [r["value"] for r in validation if r["model"] == "unet"] == ["0.2", "0.5"]
