"""Run the real `dvc` commands in a temporary copy of the repository, on a small generated dataset."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from medpipe.data.imageset import ImageSet
from tests.dvc_project import ROOT, champion_digest, commit, copy_repository, numbers_in, ran, restore, run

pytestmark = pytest.mark.integration


def test_copy_skips_local_environments_even_when_git_does_not_ignore_them(tmp_path):
    root = tmp_path / "checkout"
    (root / "venv2/lib").mkdir(parents=True)
    (root / "venv2/pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "venv2/lib/big.bin").write_bytes(b"0" * 1000)
    (root / "code.py").write_text("x = 1\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dest = tmp_path / "copy"
    copy_repository(dest, root)
    assert (dest / "code.py").is_file()
    assert not (dest / "venv2").exists()


def test_local_environments_are_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", ".venv/bin/python", "venv/x", ".tox/y"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert ignored == [".venv/bin/python", "venv/x", ".tox/y"]


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


def test_data_stages_run_and_never_leak_duplicates_across_splits(project):
    repo, env, _ = project
    run(["dvc", "repro", "augment"], repo, env)
    data = json.loads((repo / "metrics/data.json").read_text())
    assert data["train"] + data["val"] + data["test"] + data["dropped"] == 72 and data["skipped"] == 2
    details = json.loads((repo / "data/processed/split_report.json").read_text())
    assert details["dataset"] == "tiny" and details["image_size"] == 32
    reasons = details["skipped"]["by_reason"]
    assert reasons["hidden file"] == 1
    assert any(reason.startswith(("corrupt or truncated", "not an image")) for reason in reasons)
    hashes = {name: set(ImageSet.load(repo / f"data/processed/{name}").content_hashes) for name in
              ("train", "val", "test")}
    assert not (hashes["train"] & hashes["val"] or hashes["train"] & hashes["test"] or hashes["val"] & hashes["test"])
    augmented = ImageSet.load(repo / "data/processed/train_augmented")
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


DEEP = {"train@cnn_two_conv-42", "train@efficientnet_lite0-42", "train_segmenter@unet-42"}


def test_full_pipeline_is_reproducible_and_reruns_exactly_what_changed(project):
    repo, env, _ = project
    run(["dvc", "repro"], repo, env)
    for folder in ("cnn_two_conv/seed42", "efficientnet_lite0/seed42", "unet/seed42"):
        assert (repo / "models" / folder / "model.pt").is_file(), folder
    assert (repo / "plots/train/cnn_two_conv/seed42/plots/metrics/val/loss.tsv").is_file()
    headline = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(headline["classifiers"]) == {"cnn_two_conv", "efficientnet_lite0", "knn", "random_forest", "voting",
                                            "ensemble"}   # the soft vote of them all
    assert set(headline["segmenters"]) == {"unet", "pixel_classifier"}
    declared = numbers_in(headline) + numbers_in(json.loads((repo / "metrics/data.json").read_text()))
    assert declared <= 60, declared
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env).stdout
    lock = (repo / "dvc.lock").read_text()
    commit(repo, env, "baseline")

    # the same inputs give the same bytes: a forced rerun of every stage leaves dvc.lock (model hashes) as it was
    run(["dvc", "repro", "-f"], repo, env)
    assert (repo / "dvc.lock").read_text() == lock
    assert run(["git", "status", "--porcelain", "metrics", "plots"], repo, env).stdout == ""

    out = run(["dvc", "exp", "run", "-n", "lower-lr", "-S", "train.lr=1e-4"], repo, env).stdout
    assert ran(out) == DEEP | {"evaluate"}, out
    assert len(run(["dvc", "metrics", "diff", "--json"], repo, env).stdout.splitlines()) > 0
    assert "lower-lr" in run(["dvc", "exp", "show", "--csv"], repo, env).stdout
    run(["dvc", "exp", "apply", "lower-lr"], repo, env)
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == 1e-4
    run(["git", "checkout", "--", "."], repo, env)
    run(["dvc", "checkout", "--force"], repo, env)
    # the same experiment again (dvc.lock still holds the baseline): every model comes from the run-cache
    out = run(["dvc", "exp", "run", "-n", "lower-lr-again", "-S", "train.lr=1e-4"], repo, env).stdout
    assert ran(out) == {"evaluate"}, out
    assert all(f"Stage '{stage}' is cached - skipping run" in out for stage in DEEP), out
    assert run(["dvc", "exp", "diff", "lower-lr", "lower-lr-again"], repo, env).stdout.strip() == ""
    run(["git", "checkout", "--", "."], repo, env)
    run(["dvc", "checkout", "--force"], repo, env)

    out = run(["dvc", "exp", "run", "-S", "+models.cnn_two_conv.train.epochs=2"], repo, env).stdout  # + adds a key
    assert ran(out) == {"train@cnn_two_conv-42", "evaluate"}, out
    # three training seeds and the other README commands: test_readme.py

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("medpipe").experiment_id], max_results=500)
    assert {"workspace", "lower-lr"} <= {r.data.tags.get("dvc_experiment") for r in runs}
    assert all(r.data.tags.get("git_commit") for r in runs)
    champion = json.loads((repo / "reports/evaluate/champion.json").read_text())
    assert not [m for m in client.search_registered_models() if m.aliases]  # experiments move no alias
    promoted = run(["medpipe-promote"], repo, env).stdout
    registered = f"medpipe-tiny-{champion['model']}"
    assert promoted.startswith(f"models:/{registered}@champion -> version ")
    version = client.get_model_version_by_alias(registered, "champion")
    assert client.get_run(version.run_id).data.tags["model_md5"] == champion_digest(repo, champion)


def test_cross_validation_trains_only_the_fold_stages_and_hold_out_stays_byte_identical(project):
    """`-S cv.folds=[0,1]` adds the folds and one training stage per model, seed and fold, and reruns evaluate;
    the hold-out models are not retrained; back at `cv.folds: []` evaluate writes the hold-out bytes again."""
    repo, env, _ = project
    run(["git", "checkout", "--", "."], repo, env)
    run(["dvc", "checkout", "--force"], repo, env, check=False)   # a fresh copy has no cache yet
    run(["dvc", "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "hold-out", "--allow-empty"], repo, env)
    hold_out = {p: (repo / p).read_bytes() for p in ("metrics/evaluate.json", "reports/predictions/cnn_two_conv.csv")}
    seeds = yaml.safe_load((repo / "params.yaml").read_text())["seeds"]
    deep = [f"train_fold@{m}-{s}-{f}" for m in ("cnn_two_conv", "efficientnet_lite0") for s in seeds for f in (0, 1)]
    deep += [f"train_segmenter_fold@unet-{s}-{f}" for s in seeds for f in (0, 1)]
    try:
        out = run(["dvc", "exp", "run", "-n", "cv2", "-S", "cv.folds=[0,1]"], repo, env).stdout
        assert ran(out) == {"folds", *deep, "train_classical_fold@0", "train_classical_fold@1", "evaluate"}, out
        headline = json.loads((repo / "metrics/evaluate.json").read_text())
        data = json.loads((repo / "metrics/data.json").read_text())
        oof = headline["out_of_fold"]
        assert oof["folds"] == 2 and oof["images"] == data["train"] + data["val"]
        assert set(oof["classifiers"]) == {"cnn_two_conv", "efficientnet_lite0", "knn", "random_forest", "voting",
                                           "ensemble"}   # the ensemble's: its cross-fitted vote
        assert (repo / "reports/predictions/out_of_fold/unet.csv").is_file()
        assert (repo / "models/cnn_two_conv/seed42-fold1/model.pt").is_file()
        report = run(["medpipe-report", "--base", "HEAD", "--resamples", "50"], repo, env).stdout
        assert "## Model verdicts: out-of-fold" in report and "Added: `cnn_two_conv`" in report

        restore(repo, env)
        out = run(["dvc", "exp", "run", "-S", "cv.folds=[]"], repo, env).stdout
        assert ran(out) <= {"folds", "evaluate"}, out
        assert {p: (repo / p).read_bytes() for p in hold_out} == hold_out

        restore(repo, env)
        out = run(["dvc", "exp", "run", "-S", "cv.folds=[0,1]"], repo, env).stdout   # the run-cache keeps each fold
        assert ran(out) == {"evaluate"}, out
    finally:   # the tests that follow start from the committed hold-out state
        restore(repo, env)


@pytest.mark.slow
@pytest.mark.parametrize("module, stages", [
    # evaluate unpickles the classical models and the pixel classifier and runs their prediction code
    ("medpipe/classical/features.py", {"train_classical", "evaluate"}),
    ("medpipe/classical/models.py", {"train_classical", "evaluate"}),
    ("medpipe/segmentation/pixel_classifier.py", {"train_pixel_classifier", "evaluate"}),
    # the U-Net: its training stages (one per seed in params.yaml) and evaluate, no classifier, no classical model
    ("medpipe/segmentation/unet.py", {"train_segmenter@unet-{seed}", "evaluate"}),
    ("medpipe/evaluation/summary.py", {"evaluate"}),
])
def test_editing_a_module_changes_exactly_the_stages_that_import_it(project, module, stages):
    """After a repro, an edit makes exactly the stages whose code it is stale (``dvc status``), nothing else."""
    repo, env, _ = project
    run(["dvc", "repro"], repo, env)
    seeds = yaml.safe_load((repo / "params.yaml").read_text())["seeds"]  # an earlier test may have added one
    stages = {s.format(seed=seed) for s in stages for seed in seeds}
    path = repo / module
    original = path.read_text()
    try:
        path.write_text(original + "\n# edited\n")
        status = json.loads(run(["dvc", "status", "--json"], repo, env).stdout)
        assert set(status) == stages, status
    finally:
        path.write_text(original)
