"""The soft-vote ensemble: selection on validation only, an honest (cross-fitted) score, the evaluate row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_evaluation import (
    PARAMS,
    classifier_rows,
    params,
    paths,
    set_validation,
    sklearn_metrics,
    trained,  # noqa: F401  (the tiny trained models, a module fixture)
)

from medpipe import predict
from medpipe.data.imageset import ImageSet
from medpipe.evaluation import calibration, ensemble
from medpipe.predictors import SoftVoteClassifier, load_any, load_model


def one_hot_ish(labels: np.ndarray, right: np.ndarray, confident: float, classes: int = 3) -> np.ndarray:
    """Probabilities that put ``confident`` on the true class where ``right``, else on the next class, and
    share the rest evenly."""
    n = len(labels)
    target = np.where(right, labels, (labels + 1) % classes)
    proba = np.full((n, classes), (1 - confident) / (classes - 1))
    proba[np.arange(n), target] = confident
    return proba


def test_a_perfect_member_takes_all_the_weight():
    labels = np.arange(60) % 3
    rng = np.random.default_rng(0)
    candidates = {"perfect": one_hot_ish(labels, np.ones(60, bool), 0.9),
                  "noise": rng.dirichlet(np.ones(3), size=60)}
    assert ensemble.select(candidates, labels, "accuracy", rounds=10) == {"noise": 0.0, "perfect": 1.0}


def test_complementary_members_are_combined_and_beat_each_alone():
    """a is right and sure on the first 60 images, unsure and wrong on the rest; b the mirror image."""
    labels = np.arange(100) % 3
    first = np.arange(100) < 60
    a = np.where(first[:, None], one_hot_ish(labels, first, 0.9), one_hot_ish(labels, first, 0.4))
    b = np.where(first[:, None], one_hot_ish(labels, ~first, 0.4), one_hot_ish(labels, ~first, 0.9))
    vote = ensemble.soft_vote({"a": a, "b": b}, labels, "accuracy", rounds=10, folds=5, seed=0)
    assert vote.weights["a"] > 0 and vote.weights["b"] > 0 and sum(vote.weights.values()) == pytest.approx(1)
    assert vote.validation_in_sample == 1.0 and vote.validation_score == 1.0
    assert ensemble.score(labels, a, "accuracy") == pytest.approx(0.6)
    np.testing.assert_allclose(vote.predict({"a": a, "b": b}), calibration.apply_temperature(
        vote.weights["a"] * a + vote.weights["b"] * b, vote.temperature), atol=1e-12)


def test_the_cross_fitted_score_is_not_fooled_by_members_that_fit_noise():
    """Twenty random members on random labels: picking among them flatters the in-sample score only."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=120)
    candidates = {f"m{k}": rng.dirichlet(np.ones(3), size=120) for k in range(20)}
    vote = ensemble.soft_vote(candidates, labels, "accuracy", rounds=15, folds=5, seed=0)
    assert vote.validation_in_sample > 0.45           # chance is 1/3
    assert abs(vote.validation_score - 1 / 3) < 0.1
    assert vote.validation_score < vote.validation_in_sample - 0.1


def test_the_vote_is_temperature_scaled_so_its_probabilities_stay_calibrated():
    """A member right on 90% of the images but with flat probabilities (0.45 on its pick): as it is, the vote
    says 0.45 where it is right 9 times in 10; scaled by the temperature fitted on validation it says about 0.9,
    and it predicts the same classes."""
    rng = np.random.default_rng(2)
    labels = np.arange(300) % 3
    flat = one_hot_ish(labels, rng.random(300) < 0.9, 0.45)
    plain = ensemble.soft_vote({"flat": flat}, labels, "accuracy", rounds=5, folds=5, seed=0, calibrate=False)
    calibrated = ensemble.soft_vote({"flat": flat}, labels, "accuracy", rounds=5, folds=5, seed=0)
    assert plain.temperature == 1.0
    assert calibrated.temperature < 0.5       # sharpened
    assert calibrated.temperature == pytest.approx(calibration.fit_temperature(flat, labels), abs=1e-6)
    confidence = {name: vote.predict({"flat": flat}).max(1).mean() for name, vote in
                  (("plain", plain), ("calibrated", calibrated))}
    assert confidence["plain"] == pytest.approx(0.45)
    assert confidence["calibrated"] == pytest.approx(0.9, abs=0.03)
    np.testing.assert_array_equal(calibrated.predict({"flat": flat}).argmax(1), flat.argmax(1))
    assert calibrated.validation_score == plain.validation_score


# -- in the evaluate stage, on the tiny trained models of test_evaluation ---------------------------------

@pytest.fixture(scope="module")
def voted(trained, tmp_path_factory):  # noqa: F811  (the fixture imported above)
    """The evaluate stage with the ensemble on, every single model's validation score set to 0."""
    from medpipe.evaluation.stage import run

    root = tmp_path_factory.mktemp("voted")
    shutil.copytree(trained / "models", root / "models")
    for split in ("train", "val", "test"):
        shutil.copytree(trained / f"{split}", root / f"{split}")
    set_validation(root, {("cnn_a", 1): 0.0, ("cnn_a", 2): 0.0, ("cnn_b", 1): 0.0, ("cnn_b", 2): 0.0,
                          "knn": 0.0, "random_forest": 0.0})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDPIPE_TRACKING", "off")
        mp.chdir(root)   # member files are recorded as the stage sees them
        headline = run(params(evaluate={"ensemble": {"enabled": True}}), paths(Path(".")))
    return root, headline


def test_the_ensemble_is_a_headline_row_recomputable_from_its_predictions(voted):
    root, headline = voted
    test = ImageSet.load(root / "test")
    metrics = headline["classifiers"][ensemble.NAME]
    names, by_seed = classifier_rows(root / f"reports/predictions/{ensemble.NAME}.csv")
    assert sorted(by_seed) == PARAMS["seeds"]  # one vote per training seed
    per_seed = [sklearn_metrics(y, proba, 15) for y, proba in by_seed.values()]
    for metric, value in metrics.items():
        assert value == pytest.approx(float(np.mean([m[metric] for m in per_seed])), abs=1e-4), metric
    details = json.loads((root / "reports/evaluate/details.json").read_text())[ensemble.NAME]
    for record in details["seeds"].values():
        assert set(record["weights"]) == {"cnn_a", "cnn_b", "knn", "random_forest"}
        assert sum(record["weights"].values()) == pytest.approx(1)
    assert "`ensemble`" in (root / "metrics/summary.md").read_text()
    assert names == test.class_names


def test_the_ensemble_can_be_champion_and_medpipe_predict_serves_it(voted, monkeypatch):
    root, headline = voted
    monkeypatch.chdir(root)   # medpipe-predict runs where dvc repro ran
    champion = json.loads((root / "reports/evaluate/champion.json").read_text())
    record = json.loads((root / "reports/evaluate/ensemble.json").read_text())
    assert champion["model"] == ensemble.NAME and champion["selected_by"].startswith("mean cross-fitted")
    assert headline["champion"]["model"] == ensemble.NAME
    assert champion["seed"] == record["seed"] and champion["file"] == "reports/evaluate/ensemble.json"
    assert all(m["weight"] > 0 for m in record["members"])
    assert record["temperature"] > 0 and record["temperature"] != 1.0   # the vote is served temperature-scaled

    test = ImageSet.load(root / "test")
    model = load_model(predict.resolve_model(None, Path("models"), Path("reports/evaluate/champion.json"), PARAMS))
    assert isinstance(model, SoftVoteClassifier) and model.class_names == test.class_names
    _, by_seed = classifier_rows(root / f"reports/predictions/{ensemble.NAME}.csv")
    np.testing.assert_allclose(model.predict_proba(test.images), by_seed[record["seed"]][1], atol=1e-5)


def test_medpipe_promote_registers_the_ensemble_as_one_mlflow_model(voted, tmp_path, monkeypatch, capsys):
    """The ensemble champion becomes a registered MLflow model of its own (a pyfunc over its bundled members) with
    the champion alias; it loads anywhere (the bundle, not the workspace, holds the members) and predicts what
    medpipe-predict serves. Promoting it again registers nothing new; a fold average (a record whose members are
    records) is bundled the same way."""
    import mlflow
    from mlflow import MlflowClient

    from medpipe import promote

    root, _ = voted
    work = tmp_path / "work"
    shutil.copytree(root, work)
    monkeypatch.chdir(work)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("DVC_ROOT", str(work))
    monkeypatch.setenv("MEDPIPE_TRACKING", "on")
    Path("params.yaml").write_text("dataset: toy\n")
    test = ImageSet.load(Path("test"))
    expected = load_model("reports/evaluate/ensemble.json").predict_proba(test.images)

    promote.main(["--examples", "val"])
    assert capsys.readouterr().out.startswith("models:/medpipe-toy-ensemble@champion -> version 1 (ensemble, ")
    promote.main(["--examples", "val"])   # the same vote: its version, nothing registered
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert [str(v.version) for v in client.search_model_versions("name = 'medpipe-toy-ensemble'")] == ["1"]

    shutil.rmtree("models")   # the registered model carries its members
    monkeypatch.chdir(tmp_path)
    served = mlflow.pyfunc.load_model("models:/medpipe-toy-ensemble@champion")
    np.testing.assert_allclose(np.asarray(served.predict(test.images)), expected, atol=1e-6)

    monkeypatch.chdir(work)
    shutil.copytree(root / "models", "models")
    record = json.loads(Path("reports/evaluate/ensemble.json").read_text())
    folds = [{"model": m["model"], "file": m["file"], "weight": 1} for m in record["members"][:2]]
    Path("fold_average.json").write_text(json.dumps({"model": "cnn_a", "members": folds}))
    nested = {"model": ensemble.NAME, "temperature": 1.0,
              "members": [{"model": "cnn_a", "file": "fold_average.json", "weight": 1.0}]}
    Path("nested.json").write_text(json.dumps(nested))
    Path("champion.json").write_text(json.dumps({"model": "cnn_a", "seed": 1, "file": "nested.json",
                                                 "selected_by": "mean out-of-fold accuracy",
                                                 "validation_score": 0.5}))
    promote.main(["--champion", "champion.json", "--examples", "val"])
    assert "alias taken from: medpipe-toy-ensemble" in capsys.readouterr().out
    shutil.rmtree("models")
    served = mlflow.pyfunc.load_model("models:/medpipe-toy-cnn_a@champion")
    assert served.predict(test.images).shape == expected.shape


def test_an_ensemble_file_without_a_temperature_serves_the_plain_weighted_mean(voted, monkeypatch):
    """Files written before the vote was scaled (no "temperature" key) keep predicting what they did."""
    root, _ = voted
    monkeypatch.chdir(root)
    record = json.loads((root / "reports/evaluate/ensemble.json").read_text())
    old = root / "old_ensemble.json"
    old.write_text(json.dumps({"members": record["members"]}))
    test = ImageSet.load(root / "test")
    members = [(load_model(m["file"]), m["weight"]) for m in record["members"]]
    expected = sum(w * model.predict_proba(test.images) for model, w in members) / sum(w for _, w in members)
    np.testing.assert_allclose(load_any(old).predict_proba(test.images), expected, atol=1e-6)


def test_an_ensemble_file_without_members_is_refused(tmp_path):
    (tmp_path / "ensemble.json").write_text(json.dumps({"members": []}))
    with pytest.raises(ValueError, match="no member of positive weight"):
        load_any(tmp_path / "ensemble.json")


def test_an_ensemble_file_with_a_non_positive_temperature_is_refused(tmp_path):
    path = tmp_path / "ensemble.json"
    path.write_text(json.dumps({"members": [{"file": "models/classical/knn.joblib", "weight": 1.0}],
                                "temperature": 0}))
    with pytest.raises(ValueError, match=r"ensemble.json: temperature 0 is not a positive number"):
        load_any(path)


def test_a_model_may_not_be_called_ensemble(tmp_path):
    from medpipe.config import ParamsError
    from medpipe.evaluation.stage import run

    with pytest.raises(ParamsError, match="classifiers: 'ensemble' is the evaluate stage's soft vote"):
        run(params(classifiers=["cnn_a", "ensemble"]), paths(tmp_path))


@pytest.mark.parametrize(("best_right", "expected"), [(150, "cnn_a"), (124, ensemble.NAME)])
def test_prefer_ensemble_keeps_the_best_model_only_when_it_beats_the_vote_beyond_noise(best_right, expected):
    """On 200 validation images the vote gets 120 right; a model with 150 right beats it beyond noise and stays
    champion, one with 124 right is within noise of it and the vote is champion, with the comparison recorded."""
    from medpipe.evaluation import compare
    from medpipe.evaluation.config import EvaluateConfig
    from medpipe.evaluation.stage import prefer_ensemble

    labels = np.arange(200) % 3
    rng = np.random.default_rng(0)

    def on_validation(right: int) -> compare.Predictions:
        hit = np.zeros(200, bool)
        hit[rng.permutation(200)[:right]] = True
        return compare.Predictions(kind=compare.CLASSIFIER, seeds=(1,), images=np.arange(200),
                                   sources=tuple(f"v{i}" for i in range(200)), labels=labels,
                                   class_names=("a", "b", "c"), proba=one_hot_ish(labels, hit, 0.8)[None])

    reference = {"cnn_a": on_validation(best_right), ensemble.NAME: on_validation(120)}
    candidates = {"cnn_a": [(best_right / 200, "cnn_a file")], ensemble.NAME: [(0.6, "vote of seed 1")]}
    cfg = EvaluateConfig(champion_metric="accuracy", bootstrap_resamples=500)
    (name, score, chosen), record = prefer_ensemble(("cnn_a", best_right / 200, "cnn_a file"), candidates, reference,
                                                    cfg)
    assert name == expected and record["best_mean"] == "cnn_a"
    assert record["verdict"] == ("better" if expected == "cnn_a" else "within noise")
    assert record["its_difference"] == pytest.approx((best_right - 120) / 200)
    if expected == ensemble.NAME:
        assert (score, chosen) == (0.6, "vote of seed 1")
    best_mean = EvaluateConfig(champion_metric="accuracy", champion_choice="best_mean")
    assert best_mean.champion_choice == "best_mean"
    assert prefer_ensemble(None, candidates, reference, cfg) == (None, {})
