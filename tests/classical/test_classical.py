"""Classical models: features, training, saved-model interface, MLflow logging, param errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from medpipe.classical.config import ClassicalConfig
from medpipe.classical.features import Embedding, make_extractor, make_features
from medpipe.classical.models import ImageClassifier, train_all
from medpipe.classical.stage import ClassicalPaths, run
from medpipe.config import ParamsError, load_section
from medpipe.data.imageset import ImageSet
from medpipe.predictors import load_model

CLASSES = ("dark", "bright", "striped")
REPO = Path(__file__).resolve().parents[2]


def synthetic(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three separable classes: dark blobs, bright blobs, horizontal stripes (all noisy)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        base = rng.normal(60 if label == 0 else 170, 20, (size, size))
        if label == 2:
            base = 100 + 80 * (np.arange(size)[:, None] % 6 < 3) + rng.normal(0, 20, (size, size))
        images[i] = np.clip(base, 0, 255).astype(np.uint8)[..., None]
    return images, labels.astype(np.int64)


def imageset(n: int, seed: int) -> ImageSet:
    images, labels = synthetic(n, seed=seed)
    empty = np.asarray([""] * n)
    return ImageSet(images=images, labels=labels, class_names=CLASSES, source_ids=np.asarray([f"{seed}-{i}" for i in range(n)]),
                    groups=empty, content_hashes=empty, phashes=np.zeros(n, dtype=np.uint64), source_splits=empty)


FAST = {"features": ["raw", "hog", "histogram", "lbp", "glcm"], "n_jobs": 1,
        "random_forest": {"n_estimators": 20}, "svm": {"calibration_folds": 3}}


# --- features ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,expected", [
    ("raw", 32, 16 * 16),                                    # raw.size 16, grey
    ("hog", 32, 3 * 3 * 2 * 2 * 9),                          # hog.size 32 / 8 px cells = 4 cells -> 3x3 blocks
    ("histogram", 32, 3 * 32 + 5),                           # 32 bins per channel + 5 grey quantiles
    ("lbp", 32, (8 + 2) + (16 + 2)),                         # uniform LBP at radii 1 and 2
    ("glcm", 32, 6 * 2),                                     # 6 properties x 2 distances
    ("hog", 28, 3 * 3 * 2 * 2 * 9),                          # any input size: HOG resizes first
])
def test_feature_shapes(name, size, expected):
    cfg = ClassicalConfig(raw={"size": 16}, hog={"size": 32}, lbp={"radii": [1, 2]}, glcm={"distances": [1, 3]})
    images, _ = synthetic(4, size=size)
    x = make_extractor(name, cfg).fit(images).transform(images)
    assert x.shape == (4, expected) and x.dtype == np.float32 and np.isfinite(x).all()


def test_feature_union_concatenates_in_order_and_rejects_bad_input():
    cfg = ClassicalConfig(features=["histogram", "raw"], raw={"size": 8})
    images, _ = synthetic(5)
    union = make_features(cfg).fit(images)
    x = union.transform(images)
    assert x.shape == (5, 101 + 64)
    np.testing.assert_allclose(x[:, 101:], make_extractor("raw", cfg).transform(images))
    with pytest.raises(ValueError, match="uint8"):
        union.transform(images.astype(np.float32))


def test_embedding_feature_uses_the_shared_backbone():
    pytest.importorskip("medpipe.models.efficientnet")
    images, _ = synthetic(3, size=32)
    emb = Embedding(batch_size=2, pretrained=False).fit(images)
    x = emb.transform(images)
    assert x.shape == (3, 1280) and np.isfinite(x).all()


def test_embedding_upsamples_small_images_to_min_size_only():
    cfg = ClassicalConfig()
    emb = make_extractor("embedding", cfg)
    assert cfg.embedding.min_size == 64
    assert emb.input_size(28) == 64 and emb.input_size(128) == 128   # 28 px blood cells up, busi untouched
    assert Embedding(min_size=None).input_size(28) == 28
    assert Embedding(size=96, min_size=64).input_size(28) == 96        # an explicit size wins


def test_embedding_is_not_pickled_and_checks_the_weights_it_is_rebuilt_with():
    import pickle

    import torch

    pytest.importorskip("medpipe.models.efficientnet")
    images, _ = synthetic(2, size=32)
    torch.manual_seed(0)  # untrained weights: the seed makes them reproducible
    emb = Embedding(pretrained=False).fit(images)
    blob = pickle.dumps(emb)
    assert len(blob) < 10_000  # the backbone is rebuilt, not stored
    torch.manual_seed(0)
    np.testing.assert_allclose(pickle.loads(blob).transform(images), emb.transform(images), rtol=1e-5)
    torch.manual_seed(1)  # other weights than the model was fitted with
    with pytest.raises(RuntimeError, match="weights differ"):
        pickle.loads(blob).transform(images)


# --- config errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("section,match", [
    ({"features": ["hog", "sift"]}, r"classical.features.*unknown feature \['sift'\]"),
    ({"models": ["knn", "xgboost"]}, r"classical.models.*unknown model \['xgboost'\]"),
    ({"knn": {"k": 3}}, r"classical.knn.k"),
    ({"models": ["knn", "voting"]}, r"voting needs at least two"),
    ({"search": {"svm": {"C": [1, -1]}}}, r"greater than 0"),
    ({"search": {"svm": {"degree": [2]}}}, r"search.svm: unknown key"),
    ({"train_set": "both"}, r"classical.train_set"),
    ({"train_on": "plain"}, r"classical.train_on"),     # the removed key is an unknown key now
])
def test_bad_params_name_the_key(section, match):
    with pytest.raises(ParamsError, match=match):
        load_section({"classical": section}, "classical", ClassicalConfig)


def test_stage_script_reports_unknown_feature_without_traceback(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 1, "dataset": "toy", "classical": {"features": ["sift"]}}))
    proc = subprocess.run([sys.executable, str(REPO / "stages/train_classical.py"), "--params", str(params),
                           "--train", "train", "--val", "val", "--out", "models/classical"],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "unknown feature ['sift']" in proc.stderr and "Traceback" not in proc.stderr


# --- training -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    cfg = ClassicalConfig(**FAST)
    tr, va = imageset(60, seed=1), imageset(30, seed=2)
    return cfg, va, train_all(cfg, tr.images, tr.labels, va.images, va.labels, CLASSES, seed=3)


def test_every_model_learns_the_synthetic_task(trained):
    _, _, result = trained
    assert list(result.models) == ["knn", "svm", "random_forest", "voting"]
    for name, m in result.models.items():
        assert m.metrics["accuracy"] >= 0.9, (name, m.metrics)
        assert m.fit_seconds >= 0


def test_saved_model_takes_raw_images_and_round_trips(trained, tmp_path):
    import joblib

    _, va, result = trained
    for name, m in result.models.items():
        path = tmp_path / f"{name}.joblib"
        joblib.dump(m.model, path)
        loaded = load_model(path)
        assert isinstance(loaded, ImageClassifier) and loaded.class_names == CLASSES
        proba = loaded.predict_proba(va.images)
        assert proba.shape == (len(va), 3)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_array_equal(proba, m.model.predict_proba(va.images))


def test_training_is_deterministic(trained):
    cfg, va, first = trained
    tr = imageset(60, seed=1)
    second = train_all(cfg, tr.images, tr.labels, va.images, va.labels, CLASSES, seed=3)
    for name in first.models:
        np.testing.assert_array_equal(first.models[name].model.predict_proba(va.images),
                                      second.models[name].model.predict_proba(va.images))


def test_search_picks_settings_on_the_validation_split():
    cfg = ClassicalConfig(**{**FAST, "models": ["knn", "svm"],
                             "search": {"enabled": True, "knn": {"n_neighbors": [1, 7]}, "svm": {"C": [0.1, 10]}}})
    tr, va = imageset(45, seed=4), imageset(30, seed=5)
    result = train_all(cfg, tr.images, tr.labels, va.images, va.labels, CLASSES, seed=0)
    assert result.models["knn"].best_params["n_neighbors"] in (1, 7)
    assert result.models["svm"].best_params["C"] in (0.1, 10)
    assert result.models["svm"].search_score is not None


def test_svm_subset_is_stratified_seeded_and_capped():
    from medpipe.classical.models import fit_subset

    labels = np.repeat([0, 1, 2], [700, 250, 50])
    subset = fit_subset(labels, 100, seed=0)
    assert len(subset) == 100 and len(np.unique(subset)) == 100
    assert np.bincount(labels[subset]).tolist() == [70, 25, 5]              # class proportions kept
    np.testing.assert_array_equal(subset, fit_subset(labels, 100, seed=0))  # same seed, same subset
    assert not np.array_equal(subset, fit_subset(labels, 100, seed=1))
    assert fit_subset(labels, 1000, seed=0) is None and fit_subset(labels, None, seed=0) is None
    rare = np.array([0] * 98 + [1, 2])
    kept = rare[fit_subset(rare, 10, seed=0)]
    assert len(kept) == 10 and set(kept) == {0, 1, 2}                       # a rare class is never dropped


def test_max_train_images_caps_only_the_svm():
    cfg = ClassicalConfig(**{**FAST, "svm": {**FAST["svm"], "max_train_images": 30}})
    tr, va = imageset(60, seed=1), imageset(30, seed=2)
    result = train_all(cfg, tr.images, tr.labels, va.images, va.labels, CLASSES, seed=3)
    assert result.models["svm"].n_fit == 30
    assert result.models["knn"].n_fit == result.models["random_forest"].n_fit == 60
    assert result.models["svm"].metrics["accuracy"] >= 0.9
    with pytest.raises(ParamsError, match=r"classical.svm.max_train_images"):
        load_section({"classical": {"svm": {"max_train_images": 0}}}, "classical", ClassicalConfig)
    with pytest.raises(ParamsError, match=r"search.svm: unknown key"):
        load_section({"classical": {"search": {"svm": {"max_train_images": [100]}}}}, "classical", ClassicalConfig)


# --- the stage end to end ---------------------------------------------------------------------

TIMING = ("second", "time", "duration", "elapsed")


def stage_inputs(tmp_path: Path) -> ClassicalPaths:
    imageset(45, seed=1).save(tmp_path / "train")
    imageset(30, seed=2).save(tmp_path / "val")
    return ClassicalPaths(tmp_path / "train", tmp_path / "val", tmp_path / "models/classical")


def stage_params(models: list[str]) -> dict:
    return {"seed": 0, "dataset": "toy", "classical": {**FAST, "features": ["raw", "histogram"], "models": models}}


def test_stage_writes_models_and_validation_without_timings_and_rewrites_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPIPE_TRACKING", "off")
    paths = stage_inputs(tmp_path)
    paths.out.mkdir(parents=True)
    (paths.out / "svm.joblib").write_text("stale")  # a model no longer in params must disappear
    result = run(stage_params(["knn", "random_forest", "voting"]), paths)
    record = json.loads((paths.out / "validation.json").read_text())
    assert set(record) == {"knn", "random_forest", "voting"}
    for name, values in record.items():
        assert set(values) == {"accuracy", "balanced_accuracy", "f1_macro", "roc_auc"}
        assert values == pytest.approx(result.models[name].metrics)
    assert not [k for values in record.values() for k in values if any(t in k for t in TIMING)]
    assert sorted(p.name for p in paths.out.iterdir()) == ["knn.joblib", "random_forest.joblib", "validation.json",
                                                          "voting.joblib"]
    va = ImageSet.load(paths.val)
    for name, trained in result.models.items():
        np.testing.assert_array_equal(load_model(paths.out / f"{name}.joblib").predict_proba(va.images),
                                      trained.model.predict_proba(va.images))
    first = (paths.out / "validation.json").read_bytes()

    run(stage_params(["knn", "random_forest", "voting"]), paths)  # the same inputs: the same bytes
    assert (paths.out / "validation.json").read_bytes() == first

    run(stage_params(["knn"]), paths)  # models dropped from classical.models leave the folder
    assert sorted(p.name for p in paths.out.iterdir()) == ["knn.joblib", "validation.json"]
    assert set(json.loads((paths.out / "validation.json").read_text())) == {"knn"}
    assert sorted(p.name for p in paths.out.parent.iterdir()) == ["classical"]  # no temporary folder left


def test_a_failed_run_leaves_the_previous_models_untouched(tmp_path, monkeypatch):
    from medpipe.classical import stage

    monkeypatch.setenv("MEDPIPE_TRACKING", "off")
    paths = stage_inputs(tmp_path)
    run(stage_params(["knn", "random_forest"]), paths)
    before = {p.name: p.read_bytes() for p in paths.out.iterdir()}

    def fail(*args, **kwargs):
        raise RuntimeError("MLflow is down")

    monkeypatch.setattr(stage, "log_models", fail)  # fails after the new models were written
    with pytest.raises(RuntimeError, match="MLflow is down"):
        run(stage_params(["knn"]), paths)
    assert {p.name: p.read_bytes() for p in paths.out.iterdir()} == before
    assert sorted(p.name for p in paths.out.parent.iterdir()) == ["classical"]
    other = imageset(30, seed=2)
    ImageSet(**{**other.__dict__, "class_names": ("a", "b", "c")}).save(paths.val)
    with pytest.raises(ParamsError, match="class names differ"):
        run(stage_params(["knn"]), paths)
    assert {p.name: p.read_bytes() for p in paths.out.iterdir()} == before


def test_stage_registers_every_model_in_mlflow(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from medpipe.tracking.models import file_md5

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MEDPIPE_TRACKING", raising=False)
    paths = stage_inputs(tmp_path)
    run(stage_params(["knn"]), paths)
    assert sorted(p.name for p in paths.out.iterdir()) == ["knn.joblib", "validation.json"]  # no sidecar files

    version = MlflowClient().get_model_version("medpipe-toy-knn", "1")
    logged = mlflow.get_run(version.run_id)
    assert logged.data.tags["stage"] == "train_classical" and logged.data.tags["model"] == "knn"
    assert logged.data.tags["model_md5"] == file_md5(paths.out / "knn.joblib")
    assert logged.data.metrics["best_accuracy"] == json.loads((paths.out / "validation.json").read_text())["knn"]["accuracy"]
    assert "fit_seconds" in logged.data.metrics  # timings go to MLflow, not to the outputs
    assert logged.data.params["classical.train_set"] == "train"

    images = ImageSet.load(paths.val).images[:4]
    pyfunc = mlflow.pyfunc.load_model("models:/medpipe-toy-knn/1")
    assert pyfunc.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"
    np.testing.assert_allclose(pyfunc.predict(images), load_model(paths.out / "knn.joblib").predict_proba(images))
