"""A copy of the repository on a small generated dataset, for tests that run the real `dvc`, `mlflow` commands.

Its ``project`` fixture (registered for every test module by ``conftest.py``): each module gets
its own copy (module scope), set up as a fresh git repository whose default dataset is a tiny BUSI-like zip
and whose params train every model for an epoch or two.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_class_zip, sha256_of

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def copy_repository(dest: Path, root: Path = ROOT) -> None:
    """What git tracks plus the change under test (untracked files git does not ignore), as a new repository.

    Local environments are never copied, ignored or not: any folder holding a ``pyvenv.cfg`` is skipped,
    so a ``.venv/`` inside the checkout costs nothing here.
    """
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    in_environment: dict[Path, bool] = {}

    def is_environment(folder: Path) -> bool:
        if folder == root or root not in folder.parents:
            return False
        if folder not in in_environment:
            in_environment[folder] = (folder / "pyvenv.cfg").is_file() or is_environment(folder.parent)
        return in_environment[folder]

    for name in filter(None, listed):
        source = root / name
        if source.is_file() and not is_environment(source.parent):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def shrink_for_test(params: dict) -> None:
    """Every model, one epoch or a few trees: the test checks the wiring, not the accuracy."""
    params["train"].update(epochs=1, batch_size=16, patience=1)
    params["train"]["unfreeze"]["head_epochs"] = 1
    params["classifiers"] = ["cnn_two_conv", "efficientnet_lite0"]
    params["models"]["efficientnet_lite0"]["train"] = {"epochs": 2, "precision": "fp32"}
    params["models"]["unet"].update(depth=2, base_width=8, input_size=32, train={"batch_size": 8})
    classical = params["classical"]
    classical.update(features=["hog", "histogram"], models=["knn", "random_forest", "voting"])
    classical["random_forest"]["n_estimators"] = 10
    params["segment"]["pixel_classifier"].update(n_estimators=5, pixels_per_image=40)
    params["evaluate"].update(bootstrap_resamples=50, gradcam_per_class=1, grid_images=2)


def ran(out: str) -> set[str]:
    """The stages a `dvc repro`/`dvc exp run` output says it ran."""
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def commit(repo: Path, env: dict, message: str) -> None:
    run(["git", "add", "-A"], repo, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo, env)


def restore(repo: Path, env: dict, check: bool = True) -> None:
    """Back to the committed state: params.yaml and dvc.lock from git, the outputs from the cache (``check=False``:
    outputs the cache lacks, such as the committed lock's when nothing ran it here, stay as they are)."""
    run(["git", "checkout", "--", "."], repo, env)
    run(["dvc", "checkout", "--force"], repo, env, check=check)


def champion_digest(repo: Path, champion: dict) -> str:
    """The ``model_md5`` tag of the champion's registered version: its file's MD5, or for a record of several models
    (the ensemble) the digest of its members (``medpipe.promote.record_digest``, member paths read in ``repo``)."""
    import contextlib
    import hashlib

    from medpipe.promote import record_digest

    if champion["file"].endswith(".json"):
        with contextlib.chdir(repo):
            return record_digest(Path(champion["file"]))
    return hashlib.md5((repo / champion["file"]).read_bytes()).hexdigest()


def numbers_in(value) -> int:
    if isinstance(value, dict):
        return sum(numbers_in(v) for v in value.values())
    if isinstance(value, list):
        return sum(numbers_in(v) for v in value)
    return int(isinstance(value, int | float) and not isinstance(value, bool))


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
    # A fixed thread count: CPU kernels split their sums by thread, and with `threads: auto` the count would follow
    # whatever else runs on the machine, so the byte-for-byte checks would depend on it.
    # `dvc`, `python` and `medpipe-report` are those installed beside the interpreter running the tests (a venv's,
    # activated or not), not whatever an unrelated installation put earlier on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MEDPIPE_DATA_MIRROR": str(mirror),
           "MLFLOW_TRACKING_URI": f"sqlite:///{base}/mlflow.db", "MEDPIPE_THREADS": "2",
           "MEDPIPE_WORKERS_DIR": str(base / "workers")}
    env.pop("DVC_ROOT", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        run(cmd, repo, env)
    return repo, env, mirror


