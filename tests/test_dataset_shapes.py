"""Every dataset shape the readers accept runs `dvc exp run -S dataset=NAME` through `evaluate` with real DVC.

One copy of the repository (the ``project`` fixture) gains one tiny generated dataset per shape that no other
test runs through DVC: class folders without masks with a metadata CSV of group ids, a MedMNIST-layout ``.npz``
in RGB, and a ``compose`` entry built from two others. The other shapes run elsewhere: class folders with masks
(the project's default dataset, ``test_dvc_integration.py``), the source's own split folders, a grey MedMNIST
file and 5-fold cross-validation (the README's commands, ``test_readme.py``). A shape without masks must still
give DVC every output its stages promise: the U-Net and the pixel classifier are skipped, and the summary and
the report say why.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import make_class_zip, sha256_of, synthetic_scan
from tests.dvc_project import commit, ran, restore, run

pytestmark = pytest.mark.integration

CLASSES = ("benign", "malignant", "normal")
NO_MASKS = "skipped: the dataset has no segmentation masks"


def folders_entry(file: Path, **extra) -> dict:
    return {"files": [{"name": file.name, "checksum": f"sha256:{sha256_of(file)}", "urls": []}],
            "reader": "class_folders", "classes": {c: c for c in CLASSES}, "crop": "none", "image_size": 32,
            **extra}


def medmnist_npz(path: Path, rgb: bool, seed: int) -> Path:
    """The MedMNIST layout: {train,val,test}_{images,labels}, 28 px, labels of shape (N, 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 30), ("val", 9), ("test", 9)):
        labels = np.arange(n) % len(CLASSES)
        images = np.stack([synthetic_scan(rng, int(k), 28)[0] for k in labels])
        arrays[f"{split}_images"] = images if rgb else images[..., 0]
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


def medmnist_entry(file: Path) -> dict:
    return {"files": [{"name": file.name, "checksum": f"sha256:{sha256_of(file)}", "urls": []}],
            "reader": "medmnist_npz", "classes": {c: i for i, c in enumerate(CLASSES)}, "crop": "none",
            "image_size": 28}


@pytest.fixture(scope="module")
def shapes(project):
    """The project with one registry entry per dataset shape, their files in the offline copy, committed."""
    repo, env, mirror = project
    registry = yaml.safe_load((repo / "datasets.yaml").read_text())
    metadata = make_class_zip(mirror / "meta.zip", n_per_class=14, with_masks=False, size=40, seed=2, extras={
        "root/meta.csv": ("image_id,patient\n" + "".join(f"{c} ({i}),{c}-p{i // 2}\n" for c in CLASSES
                                                           for i in range(14))).encode()})
    registry["shape-metadata"] = folders_entry(metadata, metadata={"path": "root/meta.csv", "id_column": "image_id",
                                                                   "group_column": "patient"})
    registry["shape-medmnist-grey"] = medmnist_entry(medmnist_npz(mirror / "grey28.npz", rgb=False, seed=4))
    registry["shape-medmnist-rgb"] = medmnist_entry(medmnist_npz(mirror / "rgb28.npz", rgb=True, seed=5))
    registry["shape-compose"] = {
        "reader": "compose", "crop": "none", "image_size": 28,
        "compose": [{"dataset": "shape-metadata", "classes": {"benign": "benign", "normal": "normal"}},
                    {"dataset": "shape-medmnist-grey", "classes": {"malignant": "malignant"}}],
        "classes": {"benign": "benign", "normal": "normal", "malignant": "malignant"}}
    (repo / "datasets.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["classifiers"] = ["cnn_two_conv"]   # the shapes test the data path; test_dvc_integration trains the rest
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(repo, env, "dataset shapes")
    return repo, env


@pytest.mark.parametrize("dataset", ["shape-metadata", "shape-medmnist-rgb", "shape-compose"])
def test_every_dataset_shape_runs_through_evaluate(shapes, dataset):
    repo, env = shapes
    start = run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    try:
        out = run(["dvc", "exp", "run", "-S", f"dataset={dataset}"], repo, env).stdout
        assert {"download", "preprocess", "split", "train@cnn_two_conv-42", "train_classical", "evaluate"} <= ran(out)
        assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env).stdout
        headline = json.loads((repo / "metrics/evaluate.json").read_text())
        assert {"cnn_two_conv", "knn", "random_forest", "voting", "ensemble"} <= set(headline["classifiers"])
        assert headline["champion"]["model"] in headline["classifiers"]
        # no dataset here has masks: the segmenters are skipped, every output DVC was promised is there, and the
        # summary and the report say why in one line
        assert headline["segmenters"] == {}
        not_trained = f"**Not trained:** `pixel_classifier` ({NO_MASKS}); `unet` ({NO_MASKS})."
        assert not_trained in (repo / "metrics/summary.md").read_text().splitlines()
        live = repo / "plots/train/unet/seed42"
        assert json.loads((live / "metrics.json").read_text()) == {"status": NO_MASKS}
        assert [p.name for p in (live / "plots/metrics").iterdir()] == ["skipped.tsv"]   # a folder git can keep
        commit(repo, env, dataset)   # the report's base: this run, committed
        report = run(["medpipe-report", "--base", "HEAD", "--resamples", "20"], repo, env).stdout
        assert not_trained in report.splitlines()
    finally:
        run(["git", "reset", "-q", "--hard", start], repo, env)
        restore(repo, env, check=False)
