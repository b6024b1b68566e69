"""Run the real `dvc` commands in a temporary copy of the repository, on a small generated dataset."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from medpipe.imageset import ImageSet
from tests.conftest import make_class_zip, sha256_of

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def copy_repository(dest: Path) -> None:
    """The files git would commit (tracked plus untracked-but-not-ignored), as a fresh git repository."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def test_every_stage_imports_the_medpipe_of_the_checkout_it_runs_in(tmp_path):
    """Queued and temporary experiments run in a copy of the repository (`.dvc/tmp/exps/...`): their stages
    must run that copy's code, not the package the editable install points at."""
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "medpipe").mkdir()
    (tmp_path / "medpipe/__init__.py").write_text('raise SystemExit(f"medpipe of the copy: {__file__}")\n')
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        program, *args = shlex.split(stage["cmd"])
        assert program == "python", (name, stage["cmd"])
        result = subprocess.run([sys.executable, *args[:2], "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert f"medpipe of the copy: {tmp_path}" in result.stderr, (name, stage["cmd"], result.stderr[-500:])


def shrink_for_test(params: dict) -> None:
    """Every model, one epoch or a few trees: the test checks the wiring, not the accuracy."""
    params["train"].update(epochs=1, batch_size=16, patience=1)
    params["cnn"]["train"] = ["cnn_two_conv"]
    params["resnet"]["train"] = ["efficientnet_lite0"]
    params["resnet"]["models"]["efficientnet_lite0"]["epochs"] = 2
    params["resnet"]["unfreeze"]["head_epochs"] = 1
    classical = params["classical"]
    classical.update(features=["hog", "histogram"], models=["knn", "random_forest", "voting"])
    classical["random_forest"]["n_estimators"] = 10
    segment = params["segment"]
    segment.update(bootstrap_samples=100, grid_images=2)
    segment["unet"].update(epochs=1, depth=2, base_width=8, input_size=32, batch_size=8)
    segment["pixel_classifier"].update(n_estimators=5, pixels_per_image=40)
    params["evaluate"].update(bootstrap_resamples=50, gradcam_per_class=1)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the repository whose default dataset is a small generated BUSI-like zip."""
    base = tmp_path_factory.mktemp("dvc")
    repo, mirror = base / "repo", base / "mirror"
    repo.mkdir()
    mirror.mkdir()
    copy_repository(repo)
    archive = make_class_zip(mirror / "tiny.zip", n_per_class=24, size=48,
                             extras={"root/benign/.DS_Store": b"junk", "root/benign/broken.png": b"\x89PNG"})
    registry = yaml.safe_load((repo / "datasets.yaml").read_text())
    registry["tiny"] = {
        "files": [{"name": "tiny.zip", "checksum": f"sha256:{sha256_of(archive)}", "urls": []}],
        "reader": "class_folders",
        "classes": {"benign": "benign", "malignant": "malignant", "normal": "normal"},
        "mask_suffix": "_mask",
        "crop": "scan_area",
        "image_size": 32,
    }
    (repo / "datasets.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dataset"] = "tiny"
    shrink_for_test(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MEDPIPE_DATA_MIRROR": str(mirror), "MLFLOW_TRACKING_URI": f"sqlite:///{base}/mlflow.db"}
    env.pop("DVC_ROOT", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        run(cmd, repo, env)
    return repo, env, mirror


def test_data_stages_run_and_never_leak_duplicates_across_splits(project):
    repo, env, _ = project
    run(["dvc", "repro", "augment"], repo, env)
    data = json.loads((repo / "metrics/data.json").read_text())
    assert data["dataset"] == "tiny" and data["image_size"] == 32
    assert sum(s["total"] for s in data["splits"].values()) + data["duplicates"]["dropped_images"] == 72
    reasons = data["skipped"]["by_reason"]
    assert data["skipped"]["total"] == 2 and reasons["hidden file"] == 1
    assert any(reason.startswith(("corrupt or truncated", "not an image")) for reason in reasons)
    hashes = {name: set(ImageSet.load(repo / f"data/processed/{name}.npz").content_hashes) for name in
              ("train", "val", "test")}
    assert not (hashes["train"] & hashes["val"] or hashes["train"] & hashes["test"] or hashes["val"] & hashes["test"])
    augmented = ImageSet.load(repo / "data/processed/train_augmented.npz")
    counts = list(augmented.class_counts().values())
    assert len(set(counts)) == 1  # balanced
    assert set(augmented.content_hashes) <= hashes["train"]  # augmented copies come from training images only
    assert "didn't change" in run(["dvc", "repro", "augment"], repo, env).stdout


def test_changing_the_split_seed_reruns_split_but_not_download_or_preprocess(project):
    repo, env, _ = project
    run(["dvc", "repro", "augment"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"], repo, env)
    out = run(["dvc", "exp", "run", "augment", "-S", "split.seed=7"], repo, env).stdout
    assert "Running stage 'split'" in out and "Running stage 'augment'" in out
    assert "Running stage 'download'" not in out and "Running stage 'preprocess'" not in out


def test_checksum_mismatch_fails_the_stage_without_leaving_output(project, tmp_path):
    repo, env, mirror = project
    bad_mirror = tmp_path / "bad"
    bad_mirror.mkdir()
    (bad_mirror / "tiny.zip").write_bytes((mirror / "tiny.zip").read_bytes()[:-10] + b"0123456789")
    shutil.rmtree(repo / "data/raw", ignore_errors=True)
    result = run(["python", "-m", "stages.download", "--out", "data/raw"], repo,
                 {**env, "MEDPIPE_DATA_MIRROR": str(bad_mirror)}, check=False)
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr and "tiny.zip" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (repo / "data/raw").exists()
    assert not any(p.name.endswith(".tmp") for p in (repo / "data").iterdir())


def test_full_pipeline_then_an_lr_experiment_reruns_only_what_depends_on_it(project):
    repo, env, _ = project
    run(["dvc", "repro"], repo, env)
    for name in ("train_cnn", "train_resnet", "train_classical", "segment", "evaluate"):
        assert (repo / f"metrics/{name}.json").is_file(), name
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    assert {"cnn_two_conv", "efficientnet_lite0", "knn", "random_forest", "voting"} <= set(evaluated)
    assert "dice_mean" in json.dumps(json.loads((repo / "metrics/segment.json").read_text()))
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env).stdout
    run(["git", "add", "-A"], repo, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], repo, env)

    out = run(["dvc", "exp", "run", "-n", "lower-lr", "-S", "train.lr=1e-4"], repo, env).stdout
    for stage in ("train_cnn", "train_resnet", "evaluate"):
        assert f"Running stage '{stage}'" in out, stage
    for stage in ("download", "preprocess", "split", "augment", "train_classical", "segment"):
        assert f"Running stage '{stage}'" not in out, stage
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo, env).stdout)
    assert any(key.endswith("evaluate.json") for key in diff)
    assert "lower-lr" in run(["dvc", "exp", "show", "--csv"], repo, env).stdout

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("medpipe").experiment_id], max_results=200)
    assert {"workspace", "lower-lr"} <= {r.data.tags.get("dvc_experiment") for r in runs}
    champion = json.loads((repo / "models/evaluate/champion.json").read_text())
    assert champion["alias_set"] is True
    version = client.get_model_version_by_alias(champion["registered_model"], "champion")
    assert str(version.version) == str(champion["version"])
