"""medpipe-predict: the preprocessing of the pipeline, and the probabilities the evaluation computes."""

from __future__ import annotations

import io
import subprocess
import sys
import json
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
import yaml
from PIL import Image
from test_evaluation import flat_classifier

from medpipe import predict
from medpipe.data.preprocess import read_dataset
from medpipe.data.registry import get_spec

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


def scan(rng: np.random.Generator, label: int) -> np.ndarray:
    """A scan of random size on a black border (so the `scan_area` crop matters), brighter per class."""
    h, w = rng.integers(30, 60, size=2)
    image = np.zeros((h + 10, w + 14, 3), dtype=np.uint8)
    image[5:5 + h, 7:7 + w] = rng.integers(30 + 50 * label, 90 + 50 * label, size=(h, w, 1))
    return image


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """The same PNG files as a BUSI-layout archive (for the preprocess stage) and as a plain folder."""
    monkeypatch.setenv("DVC_ROOT", str(REPO))  # the real datasets.yaml: dataset busi, crop scan_area
    rng = np.random.default_rng(0)
    folder = tmp_path / "scans"
    (tmp_path / "raw").mkdir()
    with zipfile.ZipFile(tmp_path / "raw/busi.zip", "w") as zf:
        for label, name in enumerate(("benign", "malignant", "normal")):
            (folder / name).mkdir(parents=True)
            for i in range(4):
                buffer = io.BytesIO()
                image = scan(rng, label)
                Image.fromarray(image if i % 2 else image[..., 0]).save(buffer, format="PNG")  # RGB and grey
                mask = io.BytesIO()
                Image.fromarray(np.zeros(image.shape[:2], np.uint8)).save(mask, format="PNG")
                for member, data in ((f"{name} ({i}).png", buffer), (f"{name} ({i})_mask.png", mask)):
                    zf.writestr(f"Dataset_BUSI_with_GT/{name}/{member}", data.getvalue())
                    (folder / name / member).write_bytes(data.getvalue())
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"dataset": "busi", "image_size": SIZE, "preprocess": {"crop": "auto"}}))
    data = read_dataset(get_spec("busi"), tmp_path / "raw", SIZE, "auto", workers=1).imageset
    model_path = tmp_path / "model.joblib"
    joblib.dump(flat_classifier(data), model_path)
    return {"folder": folder, "params": params, "data": data, "model": model_path}


@pytest.mark.parametrize("at_once", [predict.FILES_AT_ONCE, 5])   # 5: 12 files in three batches
def test_predict_on_a_folder_equals_the_evaluation(dataset, at_once, monkeypatch):
    monkeypatch.setattr(predict, "FILES_AT_ONCE", at_once)
    out = io.StringIO()
    proba = predict.run([str(dataset["folder"]), "--model", str(dataset["model"]),
                         "--params", str(dataset["params"]), "--format", "json"], out=out)
    rows = json.loads(out.getvalue())
    assert len(rows) == 12 and not any("_mask" in r["file"] for r in rows)  # masks are skipped
    data = dataset["data"]
    expected = joblib.load(dataset["model"]).predict_proba(data.images)
    by_source = {Path(s.split(":", 1)[1]).name: p for s, p in zip(data.source_ids, expected, strict=True)}
    for row, p in zip(rows, proba, strict=True):
        np.testing.assert_allclose(p, by_source[Path(row["file"]).name], atol=1e-12)
        assert row["predicted"] == data.class_names[int(np.argmax(p))]
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)


def test_preprocessing_follows_params(dataset):
    params = yaml.safe_load(dataset["params"].read_text())
    prep = predict.Preprocessing.from_params(params)
    assert (prep.crop, prep.size) == ("scan_area", SIZE)
    params["preprocess"]["crop"] = "none"
    assert predict.Preprocessing.from_params(params).crop == "none"
    image = prep.load(dataset["folder"] / "benign" / "benign (0).png")
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert image.min() > 0  # the black border was cropped away, as the preprocess stage does


def test_request_body_for_mlflow_serving(dataset):
    out = io.StringIO()
    predict.run([str(dataset["folder"] / "normal"), "--request", "--params", str(dataset["params"])], out=out)
    body = json.loads(out.getvalue())
    assert np.asarray(body["inputs"]).shape == (4, SIZE, SIZE, 3)


def test_champion_and_errors(dataset, tmp_path):
    params = {"seed": 1, "seeds": [1, 2]}
    champion = tmp_path / "champion.json"
    with pytest.raises(FileNotFoundError, match="dvc repro evaluate"):
        predict.resolve_model(None, tmp_path / "models", champion, params)
    # what the evaluate stage writes: reports/evaluate/champion.json, the model file under "file"
    champion.write_text(json.dumps({"model": "m", "seed": None, "file": str(dataset["model"])}))
    assert predict.resolve_model(None, tmp_path / "models", champion, params) == dataset["model"]
    champion.write_text(json.dumps({}))  # no model had validation metrics
    with pytest.raises(predict.PredictError, match="names no champion"):
        predict.resolve_model(None, tmp_path / "models", champion, params)
    with pytest.raises(predict.PredictError, match="no trained model 'nope'"):
        predict.resolve_model("nope", tmp_path / "models", champion, params)
    with pytest.raises(predict.PredictError, match="no image files"):
        predict.collect_files([tmp_path / "raw"], predict.Preprocessing("none", SIZE))


def test_a_model_name_resolves_to_its_best_seed_or_its_classical_file(tmp_path):
    models = tmp_path / "models"
    for seed, score in ((1, 0.6), (2, 0.8), (3, 0.9)):
        folder = models / "cnn" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"x")
        (folder / "validation.json").write_text(json.dumps({"status": "ok", "validation": {"balanced_accuracy": score}}))
    (models / "classical").mkdir()
    (models / "classical/knn.joblib").write_bytes(b"x")
    champion = tmp_path / "champion.json"
    # seed 3 scores best but params.yaml does not select it
    assert predict.resolve_model("cnn", models, champion, {"seeds": [1, 2]}) == models / "cnn/seed2/model.pt"
    assert predict.resolve_model("cnn", models, champion, {"seeds": [1, 2, 3]}) == models / "cnn/seed3/model.pt"
    assert predict.resolve_model("knn", models, champion, {"seeds": [1]}) == models / "classical/knn.joblib"
    assert predict.resolve_model("x/any.pt", models, champion, {}) == Path("x/any.pt")
    with pytest.raises(predict.PredictError, match="no trained model 'cnn'"):
        predict.resolve_model("cnn", models, champion, {"seeds": [4]})


def test_predict_with_the_champion_record(dataset, tmp_path):
    champion = tmp_path / "champion.json"
    champion.write_text(json.dumps({"model": "flat", "file": str(dataset["model"])}))
    out = io.StringIO()
    proba = predict.run([str(dataset["folder"] / "benign"), "--params", str(dataset["params"]),
                         "--champion", str(champion), "--models-dir", str(tmp_path / "models")], out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split("\t") == ["file", "predicted", "benign", "malignant", "normal"] and len(lines) == 5
    np.testing.assert_allclose(proba.sum(1), 1.0)


def test_the_mlflow_model_class_prints_no_warning():
    """`medpipe-predict --model-uri` imports the logged model's class: MLflow checks its `predict` for type hints when
    the class is defined and, without them, prints a warning no user can act on (inside MLflow's own warning
    filter, so only the hint itself keeps it quiet)."""
    result = subprocess.run([sys.executable, "-W", "always", "-c", "import medpipe.tracking.models"],
                            capture_output=True, text=True, check=True)
    assert "type hints" not in result.stderr, result.stderr
