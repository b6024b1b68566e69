"""The evaluate stage: metrics against scikit-learn, bootstrap CIs, calibration, TTA, plots, champion."""

from __future__ import annotations

import json
import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from medpipe.evaluation import calibration, champion, pipeline, plots
from medpipe.evaluation.config import EvaluateConfig, TTAConfig
from medpipe.evaluation.scores import evaluate_with_ci, weighted_metrics
from medpipe.evaluation.tta import predict_proba_tta, tta_views
from medpipe.imageset import ImageSet
from medpipe.predictors import discover

CLASSES = ("benign", "malignant", "normal")


# -- tiny models with the interfaces of the training stages ------------------------------------------
def _flatten(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32) / 255.0


class FlatClassifier(Pipeline):
    """A sklearn Pipeline over flattened pixels, with ``class_names`` like the classical models."""

    def __init__(self, steps, *, class_names=(), memory=None, verbose=False):
        super().__init__(steps, memory=memory, verbose=verbose)
        self.class_names = class_names


def flat_classifier(data: ImageSet) -> FlatClassifier:
    model = FlatClassifier([("flat", FunctionTransformer(_flatten)), ("lr", LogisticRegression(C=0.1, max_iter=300))],
                           class_names=data.class_names)
    return model.fit(data.images, data.labels)


class TinyTorchClassifier:
    """The TorchClassifier interface: predict_proba, preprocess, model, gradcam_target_layers."""

    def __init__(self, class_names, seed: int = 0):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(4, len(class_names)),
        ).eval()
        self.class_names = tuple(class_names)
        self.name = "tiny"

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(self.model(self.preprocess(images)), dim=1).double().numpy()

    def gradcam_target_layers(self):
        return [self.model[0]]


def make_set(n_per_class=(8, 6, 5), size: int = 12, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, n in enumerate(n_per_class):
        for _ in range(n):
            img = rng.integers(0, 120, size=(size, size, 3))
            img[: size // 2, : size // 2] += 40 * label  # class-dependent bright corner
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(label)
    n = len(labels)
    return ImageSet(
        images=np.stack(images), labels=np.array(labels, dtype=np.int64), class_names=CLASSES,
        source_ids=np.array([f"img{i}" for i in range(n)]), groups=np.full(n, ""),
        content_hashes=np.array([f"h{i}" for i in range(n)]), phashes=np.zeros(n, dtype=np.uint64),
        source_splits=np.full(n, ""),
    )


# -- metrics -----------------------------------------------------------------------------------------
@pytest.fixture
def predictions():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 60)
    proba = rng.dirichlet(np.ones(3), 60)
    proba[np.arange(60), y] += rng.uniform(0, 1, 60)  # better than chance
    proba = np.round(proba / proba.sum(1, keepdims=True), 2)  # rounding makes ties
    return y, proba / proba.sum(1, keepdims=True)


def test_metrics_match_sklearn_with_weights(predictions):
    """Integer weights are resampling counts: each metric must equal sklearn's with sample_weight."""
    y, proba = predictions
    w = np.random.default_rng(2).integers(0, 4, len(y)).astype(float)
    m = {k: v[0] for k, v in weighted_metrics(y, proba, w[None], CLASSES).items()}
    pred = proba.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred, sample_weight=w))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred, sample_weight=w))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", sample_weight=w))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted", sample_weight=w))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", sample_weight=w))
    assert m["average_precision"] == pytest.approx(
        skm.average_precision_score(np.eye(3)[y], proba, average="macro", sample_weight=w))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba, sample_weight=w))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, sample_weight=w)
    for c, name in enumerate(CLASSES):
        assert m[f"precision_{name}"] == pytest.approx(precision[c])
        assert m[f"recall_{name}"] == pytest.approx(recall[c])
        assert m[f"f1_{name}"] == pytest.approx(f1[c])
        assert m[f"support_{name}"] == pytest.approx(support[c])
        tn, fp, _, _ = skm.confusion_matrix(y == c, pred == c, sample_weight=w).ravel()
        assert m[f"specificity_{name}"] == pytest.approx(tn / (tn + fp))
        assert m[f"auc_{name}"] == pytest.approx(skm.roc_auc_score(y == c, proba[:, c], sample_weight=w))


def test_ece_by_hand():
    # confidences 0.9, 0.9 (one right), 0.6 (right), 15 bins: |0.9-0.5|*2 + |0.6-1|*1 over 3 images
    y = np.array([0, 1, 0])
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    ece = weighted_metrics(y, proba, np.ones((1, 3)), ("a", "b"))["ece"][0]
    assert ece == pytest.approx((0.4 * 2 + 0.4) / 3)


def test_absent_class_is_undefined_not_a_crash():
    y = np.array([0, 0, 1, 1, 0, 1])  # class 'normal' absent from this small split
    proba = np.array([[.7, .2, .1], [.3, .6, .1], [.2, .7, .1], [.1, .3, .6], [.8, .1, .1], [.4, .5, .1]])
    r = evaluate_with_ci(y, proba, CLASSES, resamples=200)
    assert r["recall_normal"] is None and r["auc_normal"] is None and r["support_normal"] == 0
    assert r["recall_normal_ci_low"] is None
    assert r["precision_normal"] == 0.0  # predicted once, wrongly: defined and 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, proba.argmax(1)))
    assert r["roc_auc"] == pytest.approx(np.mean([skm.roc_auc_score(y == c, proba[:, c]) for c in (0, 1)]))
    json.dumps(r, allow_nan=False)  # None, never NaN, in the JSON


def test_bootstrap_interval_brackets_point_and_is_seeded(predictions):
    y, proba = predictions
    a = evaluate_with_ci(y, proba, CLASSES, resamples=300, seed=5)
    b = evaluate_with_ci(y, proba, CLASSES, resamples=300, seed=5)
    assert a == b
    assert a["accuracy_ci_low"] < a["accuracy"] < a["accuracy_ci_high"]
    # binomial standard error of the accuracy: the 95% interval is about +-1.96 SE wide
    se = np.sqrt(a["accuracy"] * (1 - a["accuracy"]) / len(y))
    assert a["accuracy_ci_high"] - a["accuracy_ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.3)
    assert "accuracy_ci_low" not in evaluate_with_ci(y, proba, CLASSES, resamples=0)


# -- calibration and TTA -------------------------------------------------------------------------------
def test_temperature_scaling_recovers_the_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(4000, 3))
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in true_p])
    overconfident = calibration.apply_temperature(true_p, 0.5)  # = softmax(2 z)
    t = calibration.fit_temperature(overconfident, y)
    assert t == pytest.approx(2.0, rel=0.1)
    fixed = calibration.apply_temperature(overconfident, t)
    assert (fixed.argmax(1) == overconfident.argmax(1)).all()
    before = weighted_metrics(y, overconfident, np.ones((1, len(y))), CLASSES)["ece"][0]
    after = weighted_metrics(y, fixed, np.ones((1, len(y))), CLASSES)["ece"][0]
    assert after < before / 2


def test_tta_views_and_average():
    cfg = TTAConfig(hflip=True, vflip=True, noise_copies=2, noise_std=0.05)
    assert [name for name, _ in tta_views(cfg)] == ["identity", "hflip", "vflip", "noise0", "noise1"]
    data = make_set()
    model = TinyTorchClassifier(CLASSES)
    a = predict_proba_tta(model, data.images, cfg, seed=3)
    assert np.allclose(a, predict_proba_tta(model, data.images, cfg, seed=3))
    assert np.allclose(a.sum(1), 1.0)
    flips_only = TTAConfig(hflip=True, vflip=False, noise_copies=0)
    expected = (model.predict_proba(data.images) + model.predict_proba(data.images[:, :, ::-1].copy())) / 2
    assert np.allclose(predict_proba_tta(model, data.images, flips_only), expected)


def test_tta_noise_keeps_grey_images_grey_and_is_off_by_default():
    grey = np.repeat(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 1), dtype=np.uint8), 3, axis=3)
    views = dict(tta_views(TTAConfig(noise_copies=1, noise_std=0.05), seed=1))
    noisy = views["noise0"](grey)
    assert noisy.dtype == np.uint8 and not np.array_equal(noisy, grey)
    assert np.array_equal(noisy[..., 0], noisy[..., 1]) and np.array_equal(noisy[..., 0], noisy[..., 2])
    assert [name for name, _ in tta_views(TTAConfig())] == ["identity", "hflip"]


def test_roc_table_area_matches_auc(predictions):
    y, proba = predictions
    rows = plots.roc_table(y, proba, CLASSES)
    assert len(rows) == 101 and rows[0]["fpr"] == 0 and rows[-1]["fpr"] == 1
    fpr = np.array([r["fpr"] for r in rows])
    for c, name in enumerate(CLASSES):
        area = np.trapezoid([r[f"tpr_{name}"] for r in rows], fpr)
        assert area == pytest.approx(skm.roc_auc_score(y == c, proba[:, c]), abs=0.02)
    pr = plots.pr_table(y, proba, CLASSES)
    assert all(0 <= r["precision"] <= 1 for r in pr)


# -- the stage -----------------------------------------------------------------------------------------
@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """models/, metrics/ and data splits as the training stages leave them, MLflow in tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    train, val, test = make_set(seed=0), make_set(seed=1), make_set(seed=2)
    val.save(tmp_path / "val.npz")
    test.save(tmp_path / "test.npz")
    (tmp_path / "models/train_classical").mkdir(parents=True)
    (tmp_path / "models/train_cnn").mkdir(parents=True)
    joblib.dump(flat_classifier(train), tmp_path / "models/train_classical/logreg.joblib")
    torch.save({"placeholder": True}, tmp_path / "models/train_cnn/tiny.pt")
    deep = TinyTorchClassifier(CLASSES)
    real_load = pipeline.load_model
    monkeypatch.setattr(pipeline, "load_model", lambda p: deep if p.suffix == ".pt" else real_load(p))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/train_classical.json").write_text(json.dumps({"logreg": {"balanced_accuracy": 0.9}}))
    (tmp_path / "metrics/train_cnn.json").write_text(json.dumps({"tiny": {"balanced_accuracy": 0.4}}))
    return tmp_path


def _register(name: str) -> dict:
    """A registered model version in the temporary MLflow store, as a training stage leaves it."""
    from mlflow import MlflowClient

    from medpipe import tracking

    with tracking.start_run("train_classical", "toy", name) as run:
        pass
    client = MlflowClient()
    client.create_registered_model(f"medpipe-toy-{name}")
    version = client.create_model_version(f"medpipe-toy-{name}", source=f"runs:/{run.info.run_id}/{name}",
                                          run_id=run.info.run_id)
    return {"run_id": run.info.run_id, "registered_model": f"medpipe-toy-{name}", "version": int(version.version),
            "model_uri": f"models:/medpipe-toy-{name}/{version.version}"}


def outputs(root) -> pipeline.Outputs:
    return pipeline.Outputs(metrics=root / "out/evaluate.json", summary=root / "out/summary.md",
                            plots=root / "plots/evaluate", champion=root / "models/evaluate/champion.json")


def run_stage(root, **evaluate):
    params = {"seed": 1, "evaluate": {"bootstrap_resamples": 100, "gradcam_per_class": 1, **evaluate}}
    return pipeline.evaluate(params, root / "models", root / "metrics", root / "test.npz", root / "val.npz",
                             outputs(root))


def test_stage_scores_every_model_and_crowns_the_champion(workspace):
    sidecar = _register("logreg")
    (workspace / "models/train_classical/logreg.mlflow.json").write_text(json.dumps(sidecar))
    results = run_stage(workspace)
    saved = json.loads((workspace / "out/evaluate.json").read_text())
    assert set(saved) == {"logreg", "tiny", "tiny_tta"} and saved == json.loads(json.dumps(results))
    for model in saved.values():  # flat: model -> metric, so `dvc metrics diff` reads per model
        assert all(not isinstance(v, dict | list) for v in model.values())
        assert model["accuracy_ci_low"] <= model["accuracy"] <= model["accuracy_ci_high"]
    assert "temperature" in saved["logreg"] and "ece_ts" in saved["logreg"]
    test = ImageSet.load(workspace / "test.npz")
    from medpipe.predictors import load_model

    proba = load_model(workspace / "models/train_classical/logreg.joblib").predict_proba(test.images)
    assert saved["logreg"]["accuracy"] == pytest.approx(skm.accuracy_score(test.labels, proba.argmax(1)))
    for kind in ("confusion", "roc", "pr", "calibration"):
        assert {p.name for p in (workspace / "plots/evaluate" / kind).iterdir()} == {"logreg.csv", "tiny.csv"}
    confusion = (workspace / "plots/evaluate/confusion/logreg.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == len(test) + 1
    assert (workspace / "plots/evaluate/figures/logreg.png").stat().st_size > 1000
    assert [p.name for p in (workspace / "plots/evaluate/gradcam").iterdir()] == ["tiny.png"]
    record = json.loads((workspace / "models/evaluate/champion.json").read_text())
    assert record["model"] == "logreg" and record["alias_set"] is True
    from mlflow import MlflowClient

    assert str(MlflowClient().get_model_version_by_alias("medpipe-toy-logreg", "champion").version) == "1"
    summary = (workspace / "out/summary.md").read_text()
    assert "`tiny_tta`" in summary and "Champion" in summary and "temperature" in summary


def test_stage_skips_a_missing_stage_but_fails_without_models(workspace, caplog):
    for f in (workspace / "models/train_cnn").iterdir():
        f.unlink()
    run_stage(workspace, temperature_scaling=False, tta={"enabled": False})
    assert "train_cnn" in caplog.text and "train_resnet" in caplog.text
    assert set(json.loads((workspace / "out/evaluate.json").read_text())) == {"logreg"}
    for f in (workspace / "models/train_classical").iterdir():
        f.unlink()
    with pytest.raises(pipeline.NoModelError, match="no trained model"):
        run_stage(workspace)


def test_bad_params_fail_before_work(workspace):
    from medpipe.config import ParamsError

    with pytest.raises(ParamsError, match="evaluate.bootstrap_resampels"):
        run_stage(workspace, bootstrap_resampels=10)
    with pytest.raises(ParamsError, match="evaluate.champion_metric"):
        run_stage(workspace, champion_metric="loss")


def test_champion_choice_uses_validation_metrics(tmp_path):
    (tmp_path / "models/train_cnn").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (tmp_path / f"models/train_cnn/{name}.pt").write_bytes(b"x")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/train_cnn.json").write_text(json.dumps({"a": {"f1_macro": 0.7}, "b": {"f1_macro": 0.8}}))
    models = discover(tmp_path / "models")
    scores = champion.validation_scores(models, tmp_path / "metrics", "f1_macro")
    assert scores == {"a": 0.7, "b": 0.8} and champion.choose(scores) == "b"
    assert champion.choose({}) is None
    assert EvaluateConfig().champion_metric == "balanced_accuracy"


def test_gradcam_overlay_accepts_maps_at_the_model_input_size(tmp_path):
    """A model that upsamples its input (input_size 224 on 128 px images) gives larger heat maps."""
    from medpipe.evaluation import gradcam

    images = np.zeros((3, 16, 16, 3), np.uint8)
    maps = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    gradcam.overlay_figure(tmp_path / "g.png", "t", images, maps, np.array([0, 1, 2]), np.array([0, 0, 2]), CLASSES)
    assert (tmp_path / "g.png").stat().st_size > 1000
    picks = gradcam.sample_per_class(np.array([0, 0, 0, 1, 2, 2]), 2, seed=1)
    assert list(np.bincount(np.array([0, 0, 0, 1, 2, 2])[picks])) == [2, 1, 2]
