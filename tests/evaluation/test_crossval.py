"""Cross-validation in the evaluate stage: out-of-fold predictions, fold-averaged test scores, the champion."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_evaluation import params, paths

from medpipe.config import ParamsError
from medpipe.data.folds import FoldsPaths
from medpipe.data.folds import run as run_folds
from medpipe.data.imageset import ImageSet, fold_file
from medpipe.evaluation import compare
from medpipe.evaluation.stage import run
from medpipe.predictors import load_any, load_model
from tests.conftest import distinct, make_set

FOLDS = [0, 1, 2]


def cv_params(folds: list[int] = FOLDS) -> dict:
    p = params(classifiers=["cnn_a"], seeds=[1],
               evaluate={"bootstrap_resamples": 50, "gradcam_per_class": 1, "grid_images": 2,
                         "ensemble": {"enabled": True}})
    return p | {"cv": {"folds": folds}, "split": {"seed": 3, "near_duplicate_distance": 4}}


def train_fold_models(root: Path, p: dict) -> None:
    """models/ as the fold training stages leave it (cnn_a and the U-Net per fold, the classical models per fold)."""
    from medpipe.classical.stage import ClassicalPaths
    from medpipe.classical.stage import run as run_classical
    from medpipe.segmentation.unet_stage import run as run_segmenter
    from medpipe.training.stage import TrainPaths
    from medpipe.training.stage import run as run_training

    folds = root / "folds"
    for fold in FOLDS:
        data = {name: fold_file(folds, fold, name) for name in ("train", "val")}
        norm = data["val"].with_name("normalization.json")
        for name, run_stage in (("cnn_a", run_training), ("unet", run_segmenter)):
            run_stage(p, TrainPaths(name, 1, data["train"], data["val"], norm, root / f"models/{name}/seed1-fold{fold}",
                                    root / f"live/{name}/seed1-fold{fold}", fold=fold))
        run_classical(p, ClassicalPaths(data["train"], data["val"], root / f"models/classical-fold{fold}", fold=fold))


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    distinct(make_set((20, 12, 10), size=16, seed=0, masks=True), "t", 0).save(root / "train")
    distinct(make_set((5, 3, 3), size=16, seed=1, masks=True), "v", 1).save(root / "val")
    distinct(make_set((8, 6, 5), size=16, seed=2, masks=True), "x", 2).save(root / "test")
    p = cv_params()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDPIPE_TRACKING", "off")
        mp.setenv("DVC_ROOT", str(root))
        run_folds(p, FoldsPaths(root / "train", root / "val", root / "folds"))
        train_fold_models(root, p)
        headline = run(p, paths(root))
    return root, headline


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_train_and_val_image_is_predicted_once_by_the_model_that_never_saw_it(cross_validated):
    root, _ = cross_validated
    pool = {str(s) for split in ("train", "val") for s in ImageSet.load(root / f"{split}").source_ids}
    for name in ("cnn_a", "knn", "random_forest", "ensemble"):
        rows = read_csv(root / f"reports/predictions/out_of_fold/{name}.csv")
        assert Counter(r["source"] for r in rows) == Counter({s: 1 for s in pool}), name
    rows = {r["source"]: r for r in read_csv(root / "reports/predictions/out_of_fold/cnn_a.csv")}
    for fold in FOLDS:
        heldout = ImageSet.load(fold_file(root / "folds", fold, "heldout"))
        model = load_any(root / f"models/cnn_a/seed1-fold{fold}/model.pt")
        proba = model.predict_proba(heldout.images)
        written = np.array([[float(rows[str(s)][f"p_{c}"]) for c in heldout.class_names] for s in heldout.source_ids])
        np.testing.assert_allclose(written, proba, atol=1e-6)
    # the U-Net: the pool's images with a lesion, each once
    lesion = {str(s) for split in ("train", "val") for data in [ImageSet.load(root / f"{split}")]
              for s, m in zip(data.source_ids, data.masks, strict=True) if m.any()}
    assert {r["source"] for r in read_csv(root / "reports/predictions/out_of_fold/unet.csv")} == lesion


def test_the_test_split_is_scored_by_the_average_of_the_fold_models(cross_validated):
    root, headline = cross_validated
    test = ImageSet.load(root / "test")
    mean = np.mean([load_any(root / f"models/cnn_a/seed1-fold{f}/model.pt").predict_proba(test.images)
                    for f in FOLDS], axis=0)
    written = compare.load_predictions(root / "reports/predictions/cnn_a.csv")
    np.testing.assert_allclose(written.proba[0], mean, atol=1e-6)
    assert headline["classifiers"]["cnn_a"]["accuracy"] == pytest.approx(
        float((mean.argmax(1) == test.labels).mean()), abs=1e-4)


def test_out_of_fold_headline_intervals_and_summary(cross_validated):
    root, headline = cross_validated
    oof = headline["out_of_fold"]
    assert oof["folds"] == 3 and oof["images"] == 53
    assert set(oof["classifiers"]) == {"cnn_a", "knn", "random_forest", "ensemble"}
    assert set(oof["segmenters"]) == {"unet"}
    # the ensemble's out-of-fold predictions are its cross-fitted vote, the score it competes for champion with
    vote = json.loads((root / "reports/evaluate/ensemble.json").read_text())
    assert oof["classifiers"]["ensemble"]["balanced_accuracy"] == pytest.approx(vote["validation_cross_fitted"],
                                                                                abs=1e-4)
    predictions = compare.load_predictions(root / "reports/predictions/out_of_fold/knn.csv")
    assert oof["classifiers"]["knn"]["balanced_accuracy"] == pytest.approx(
        compare.point_estimates(predictions)["balanced_accuracy"], abs=1e-4)
    details = json.loads((root / "reports/evaluate/details.json").read_text())["knn"]["out_of_fold"]
    mean = details["seed_mean"]
    assert mean["balanced_accuracy_ci_low"] <= mean["balanced_accuracy"] <= mean["balanced_accuracy_ci_high"]
    summary = (root / "metrics/summary.md").read_text()
    assert "## Out-of-fold (3 folds, 53 train + val images" in summary
    assert summary.index("## Out-of-fold") < summary.index("## Classifiers (test split")
    assert "## Calibration: temperature scaling fitted on the out-of-fold predictions" in summary


def test_the_champion_is_chosen_out_of_fold_and_its_file_serves_the_fold_average(cross_validated):
    root, headline = cross_validated
    champion = json.loads((root / "reports/evaluate/champion.json").read_text())
    assert champion["selected_by"].endswith("out-of-fold balanced_accuracy")
    assert headline["champion"]["out_of_fold_balanced_accuracy"] == pytest.approx(champion["validation_score"],
                                                                                  abs=1e-4)
    candidates = {name: values["balanced_accuracy"] for name, values in headline["out_of_fold"]["classifiers"].items()}
    if champion["model"] != "ensemble":  # the ensemble competes with its cross-fitted out-of-fold score
        assert champion["validation_score"] == pytest.approx(max(candidates.values()), abs=1e-4)
    test = ImageSet.load(root / "test")
    served = load_model(root / champion["file"]).predict_proba(test.images)
    written = compare.load_predictions(root / f"reports/predictions/{champion['model']}.csv")
    np.testing.assert_allclose(served, written.proba[0], atol=1e-6)
    vote = json.loads((root / "reports/evaluate/ensemble.json").read_text())
    assert vote["selected_on"] == "out-of-fold balanced_accuracy"
    assert all(m["file"].startswith(str(root / "reports/evaluate/folds")) for m in vote["members"])


def test_folds_written_for_another_k_are_refused(cross_validated, tmp_path, monkeypatch):
    root, _ = cross_validated
    monkeypatch.setenv("MEDPIPE_TRACKING", "off")
    for name in ("models", "folds"):
        shutil.copytree(root / name, tmp_path / name)
    for split in ("train", "val", "test"):
        shutil.copytree(root / f"{split}", tmp_path / f"{split}")
    with pytest.raises(ParamsError, match="holds 3 folds but cv.folds asks for 2"):
        run(cv_params([0, 1]), paths(tmp_path))
