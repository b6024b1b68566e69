"""The README runs: every command of its fenced `bash` blocks, as a user types it, in a small generated project.

``COMMANDS`` says, for each command of the README, how this test runs it: as written, as its offline twin (with
the reason), or not here (with the reason and where it does run). A command added to the README without an
entry here fails ``test_every_readme_command_has_a_runner``; the integration test then runs them all, in the
order a user would: the pipeline once on main, each experiment from main, then the review, MLflow, prediction
and promotion commands on the last experiment.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import socket
import subprocess
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import png_bytes, sha256_of, synthetic_scan
from tests.dvc_project import ROOT, commit, ran, restore, run

README = ROOT / "README.md"


@dataclass(frozen=True)
class Runner:
    how: str                 # "as written" | "twin" | "not here"
    instead: str = ""        # the twin command
    why: str = ""            # why a twin, or why not here (and where it runs)


AS_WRITTEN = Runner("as written")
COMMANDS = {
    "python -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && dvc repro": Runner(
        "twin", "dvc repro", "the install is what .ci/run does on a fresh machine before this suite; the test "
        "environment is that install"),
    "python -m pytest -q": Runner("not here", why="the suite this test belongs to (.ci/run runs it)"),
    "dvc exp run -S train.lr=1e-4": AS_WRITTEN,
    "dvc exp run -S 'seeds=[42,43,44]'": AS_WRITTEN,
    "dvc exp run -S 'cv.folds=[0,1,2,3,4]'": AS_WRITTEN,
    "dvc exp run -S dataset=brain-tumor-4class": Runner(
        "twin", "dvc exp run -S dataset=brain-tumor-4class", "the real file's 2,870 images take about 4 minutes at this "
        "test's settings: the entry runs with a generated zip of the same layout (class folders under Training/ and "
        "Testing/, no masks); benchmarks/registry_smoke.py runs the real entry"),
    "dvc exp show --only-changed --drop '.*/.*|^(manifests|models)$'": AS_WRITTEN,
    "medpipe-report --base main > report.md": AS_WRITTEN,
    "dvc metrics diff && dvc plots diff": AS_WRITTEN,
    "mlflow ui --backend-store-uri sqlite:///mlflow.db": AS_WRITTEN,   # started, asked on loopback, stopped
    "medpipe-predict path/to/images/": AS_WRITTEN,   # the folder holds a few generated images
    "medpipe-promote": AS_WRITTEN,
    "dvc exp run -n pneumonia -S dataset=pneumoniamnist": Runner(
        "twin", "dvc exp run -n pneumonia -S dataset=pneumoniamnist", "the file comes from Zenodo (internet): the "
        "README's entry runs with a generated MedMNIST-layout file of the same name, and its checksum"),
    "dvc exp run -n r34 -S 'classifiers=[cnn_two_conv,efficientnet_lite0,resnet18,resnet34]'": AS_WRITTEN,
    "dvc exp run -n full -S 'classifiers=[cnn_two_conv,cnn_brain_mri,efficientnet_lite0,resnet18]' "
    "-S models.efficientnet_lite0.train.epochs=12 -S models.resnet18.train.epochs=15 "
    "-S segment.pixel_classifier.n_estimators=60 -S models.unet.encoder=efficientnet_lite0": AS_WRITTEN,
    'python -m pytest -q -m "not slow"': Runner("not here", why="a subset of this suite"),
    "python -m pytest -q tests/test_docs.py": Runner("not here", why="a module of this suite"),
}


def fenced_blocks(text: str, language: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M)]


def commands_in(block: str) -> list[str]:
    """The commands of a shell block: comments dropped, backslash continuations joined, spaces collapsed."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        code = line.split("  #")[0].strip() if not line.lstrip().startswith("#") else ""
        if code:
            commands.append(" ".join(code.split()))
    return commands


def readme_commands() -> list[str]:
    return [c for block in fenced_blocks(README.read_text(), "bash") for c in commands_in(block)]


def test_every_readme_command_has_a_runner():
    commands = readme_commands()
    assert sorted(set(commands) - set(COMMANDS)) == [], "README commands this test does not run"
    assert sorted(set(COMMANDS) - set(commands)) == [], "entries here that the README no longer shows"
    assert all(r.why for r in COMMANDS.values() if r.how != "as written")


def test_the_readme_yaml_examples_are_valid_entries():
    """The dataset entry and the model entry the README shows load as a registry entry and a model spec."""
    from medpipe.data.registry import DatasetSpec
    from medpipe.training.config import ClassifierSpec

    dataset, model = (yaml.safe_load(b) for b in fenced_blocks(README.read_text(), "yaml"))
    (name, entry), = dataset.items()
    assert DatasetSpec(name=name, **entry).reader == "medmnist_npz"
    (name, spec), = model["models"].items()
    assert ClassifierSpec(**spec).arch == name


def free_port(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def mlflow_ui_answers(repo: Path, env: dict, command: str) -> None:
    """Start `mlflow ui` as written, wait until it answers on loopback (port 5000), stop it."""
    assert free_port(5000), "port 5000 is taken: mlflow ui cannot start as the README writes it"
    server = subprocess.Popen(shlex.split(command), cwd=repo, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:5000/health", timeout=2) as response:
                    assert response.status == 200
                    return
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(1)
        raise AssertionError("mlflow ui did not answer on 127.0.0.1:5000 within 90 s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def medmnist_file(path: Path, classes: int) -> str:
    """A MedMNIST-layout file (grey, 28 px) at ``path``; its MD5, as the registry's checksum names it."""
    rng = np.random.default_rng(11)
    arrays = {}
    for split, n in (("train", 30), ("val", 8), ("test", 8)):
        labels = np.arange(n) % classes
        arrays[f"{split}_images"] = np.stack([synthetic_scan(rng, int(k), 28)[0][..., 0] for k in labels])
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return hashlib.md5(path.read_bytes()).hexdigest()


def split_folders_zip(path: Path, folders: list[str], n_per_class: int = 12) -> str:
    """Class folders under Training/ and Testing/ (every fourth image), as brain-tumor-4class ships; its sha256."""
    rng = np.random.default_rng(3)
    with zipfile.ZipFile(path, "w") as zf:
        for label, folder in enumerate(folders):
            for i in range(n_per_class):
                split = "Testing" if i % 4 == 0 else "Training"
                zf.writestr(f"{split}/{folder}/{i}.png", png_bytes(synthetic_scan(rng, label % 3, 40)[0]))
    return sha256_of(path)


@pytest.fixture(scope="module")
def readme_project(project):
    """The project on main as the README's user has it: the README's dataset and model entries added, the files of
    the entries its commands name generated in the offline copy (same names and layouts), MLflow's store at the
    repository root, one classifier by default (the README's commands name the others where they add them)."""
    repo, env, mirror = project
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}   # sqlite:///mlflow.db, as the README has it
    registry = yaml.safe_load((repo / "datasets.yaml").read_text())
    dataset, model = (yaml.safe_load(b) for b in fenced_blocks(README.read_text(), "yaml"))
    (name, entry), = dataset.items()
    file = entry["files"][0]
    file["checksum"] = f"md5:{medmnist_file(mirror / file['name'], len(entry['classes']))}"
    tumour = registry["brain-tumor-4class"]
    file = tumour["files"][0]
    tumour["files"] = [{"name": file["name"], "urls": [],
                        "checksum": f"sha256:{split_folders_zip(mirror / file['name'], list(tumour['classes'].values()))}"}]
    tumour["image_size"] = 32
    (repo / "datasets.yaml").write_text(yaml.safe_dump({**registry, name: entry}, sort_keys=False))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"].update(model["models"])
    params["classifiers"] = ["cnn_two_conv"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(repo, env, "the README's entries")
    run(["git", "branch", "-M", "main"], repo, env)
    images = repo / "path/to/images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for k in range(3):
        (images / f"scan{k}.png").write_bytes(png_bytes(synthetic_scan(rng, k, 48)[0]))
    return repo, env


DEEP = {"train@cnn_two_conv-{seed}", "train_segmenter@unet-{seed}"}
NO_MASKS = "skipped: the dataset has no segmentation masks"


def stages(names: set[str], *seeds: int) -> set[str]:
    return {n.format(seed=s) for n in names for s in seeds}


def check_seeds(repo: Path) -> None:
    details = json.loads((repo / "reports/evaluate/details.json").read_text())
    assert len(details["cnn_two_conv"]["headline_per_seed"]) == 3 and details["cnn_two_conv"]["std"]["accuracy"] >= 0


def check_folds(repo: Path) -> None:
    oof = json.loads((repo / "metrics/evaluate.json").read_text())["out_of_fold"]
    data = json.loads((repo / "metrics/data.json").read_text())
    assert oof["folds"] == 5 and oof["images"] == data["train"] + data["val"] and "unet" in oof["segmenters"]


def check_no_masks(repo: Path) -> None:
    summary = (repo / "metrics/summary.md").read_text()
    assert f"**Not trained:** `pixel_classifier` ({NO_MASKS}); `unet` ({NO_MASKS})." in summary.splitlines()


# each from main, as the README offers them: (command, the stages it runs: exactly, or at least with "<=", a check)
EXPERIMENTS = [
    ("dvc exp run -S 'seeds=[42,43,44]'", "==", stages(DEEP, 43, 44) | {"evaluate"}, check_seeds),
    ("dvc exp run -S 'cv.folds=[0,1,2,3,4]'", "==", {"folds", "evaluate"} | {
        f"{stage}@{model}-42-{f}" for f in range(5) for stage, model in (("train_fold", "cnn_two_conv"),
                                                                         ("train_segmenter_fold", "unet"))}
     | {f"train_classical_fold@{f}" for f in range(5)}, check_folds),
    ("dvc exp run -n pneumonia -S dataset=pneumoniamnist", "<=", {"download", "train_classical", "evaluate"}, None),
    # "Only the new model's stage and evaluate run" (the project trains cnn_two_conv alone: three are new here)
    ("dvc exp run -n r34 -S 'classifiers=[cnn_two_conv,efficientnet_lite0,resnet18,resnet34]'", "==",
     {"train@efficientnet_lite0-42", "train@resnet18-42", "train@resnet34-42", "evaluate"}, None),
    ("dvc exp run -n full -S 'classifiers=[cnn_two_conv,cnn_brain_mri,efficientnet_lite0,resnet18]' "
     "-S models.efficientnet_lite0.train.epochs=12 -S models.resnet18.train.epochs=15 "
     "-S segment.pixel_classifier.n_estimators=60 -S models.unet.encoder=efficientnet_lite0", "<=",
     {"train@cnn_brain_mri-42", "train_segmenter@unet-42", "train_pixel_classifier", "evaluate"}, None),
    ("dvc exp run -S dataset=brain-tumor-4class", "<=", {"download", "split", "train@cnn_two_conv-42", "evaluate"},
     check_no_masks),
    # "only the deep models and evaluate rerun"; last, and left in the workspace: the change the review looks at
    ("dvc exp run -S train.lr=1e-4", "==", stages(DEEP, 42) | {"evaluate"}, None),
]


@pytest.mark.integration
def test_every_readme_command_runs(readme_project):
    repo, env = readme_project
    executed = []   # the README commands run, as written or as their twin

    def shell(command: str) -> subprocess.CompletedProcess:
        executed.append(command)
        return run(["bash", "-c", COMMANDS[command].instead or command], repo, env)

    shell(readme_commands()[0])   # the install line's twin: dvc repro
    commit(repo, env, "dvc repro")
    for command, how, expected, check in EXPERIMENTS:
        out = shell(command).stdout
        assert (ran(out) == expected) if how == "==" else (expected <= ran(out)), (command, sorted(ran(out)))
        assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env).stdout, command
        if check:
            check(repo)
        if command != EXPERIMENTS[-1][0]:
            restore(repo, env)
    wide = {**env, "COLUMNS": "2000"}   # a terminal wide enough for the table (off a terminal rich cuts it to 80)
    executed.append("dvc exp show --only-changed --drop '.*/.*|^(manifests|models)$'")
    shown = run(["bash", "-c", executed[-1]], repo, wide).stdout
    assert "Experiment" in shown and "pneumonia" in shown and "r34" in shown   # (columns beyond DVC's width cut)
    shell("medpipe-report --base main > report.md")
    report = (repo / "report.md").read_text()
    assert "## Parameters changed" in report and "train.lr" in report and "| cnn_two_conv | accuracy |" in report
    diffs = shell("dvc metrics diff && dvc plots diff").stdout
    assert "metrics/evaluate.json" in diffs and "dvc_plots/index.html" in diffs
    executed.append("mlflow ui --backend-store-uri sqlite:///mlflow.db")
    mlflow_ui_answers(repo, env, executed[-1])
    table = shell("medpipe-predict path/to/images/")
    assert table.stdout.splitlines()[0].split("\t")[:2] == ["file", "predicted"] and len(table.stdout.splitlines()) == 4
    assert table.stderr == ""   # the result alone: no warning a user cannot act on
    champion = json.loads((repo / "reports/evaluate/champion.json").read_text())["model"]
    promoted = shell("medpipe-promote")   # the ensemble too: registered as one model when first promoted
    assert promoted.stdout.startswith(f"models:/medpipe-tiny-{champion}@champion -> version "), promoted.stdout
    assert sorted(executed) == sorted(c for c in readme_commands() if COMMANDS[c].how != "not here")
