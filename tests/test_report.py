"""medpipe-report: paired verdicts against a base revision in a throwaway git + DVC repository."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest

from medpipe import report
from medpipe.evaluation import compare as cmp
from tests.evaluation.test_compare import classifier, labelled_images, right_on, segmenter

FAST = report.Settings(resamples=300)


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def write_predictions(directory, **models: cmp.Predictions) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, predictions in models.items():
        (directory / f"{name}.csv").write_text(cmp.to_csv(predictions))


def unet(n_images: int, shift: float = 0.0) -> cmp.Predictions:
    dice = np.linspace(0.4, 0.9, n_images)[None] + shift
    return segmenter(dice, np.full((1, n_images), 8.0))


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git + DVC repository whose `main` tracks reports/predictions with `dvc add`."""
    monkeypatch.chdir(tmp_path)
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "config", "user.email", "t@example.com")
    git(tmp_path, "config", "user.name", "t")
    subprocess.run(["dvc", "init", "-q"], check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  evaluate:\n    cmd: 'true'\n    params: [evaluate]\n")
    (tmp_path / "params.yaml").write_text("evaluate:\n  lr: 0.001\n")
    return tmp_path


def other_sources(predictions: cmp.Predictions) -> cmp.Predictions:
    return replace(predictions, sources=tuple(f"other/{s}" for s in predictions.sources))


def commit_base(repo, predictions) -> None:
    subprocess.run(["dvc", "add", "-q", str(predictions.relative_to(repo))], check=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")


def table_rows(text: str, model: str) -> dict[str, list[str]]:
    """{metric: cells} of ``model``'s rows in the verdict table."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {model} |")]
    return {cells[1]: cells for cells in rows}


@pytest.mark.skipif(shutil.which("dvc") is None, reason="needs the dvc command")
def test_report_gives_paired_verdicts_against_the_base_revision(repo):
    labels = labelled_images()
    predictions = repo / "reports/predictions"
    write_predictions(predictions, cnn=classifier(labels, right_on(140)),
                      adaboost=classifier(labels, right_on(150)), svm=classifier(labels, right_on(150)),
                      old=classifier(labels, right_on(100)), unet=unet(20), elsewhere=unet(5))
    commit_base(repo, predictions)
    (repo / "params.yaml").write_text("evaluate:\n  lr: 0.0001\n")
    (predictions / "old.csv").unlink()
    other_150 = (np.arange(200) >= 10) & (np.arange(200) < 160)   # as many right as before, other images
    write_predictions(predictions, cnn=classifier(labels, right_on(170)), svm=classifier(labels, other_150),
                      new=classifier(labels, right_on(90)),
                      unet=unet(21, shift=0.05),  # one more test image: the split changed
                      elsewhere=other_sources(unet(5)))  # no test image in common

    text = report.build_report("main", settings=FAST)

    assert "vs `main`" in text
    assert "evaluate.lr" in text and "0.0001" in text  # dvc params diff --md, at the top
    assert text.index("## Parameters changed") < text.index("## Model verdicts")
    cnn, svm = table_rows(text, "cnn"), table_rows(text, "svm")
    assert set(cnn) == {"accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "ece ↓"}
    assert cnn["accuracy"][2:5] == ["0.7000", "0.8500", "+0.1500"]
    assert cnn["accuracy"][6].startswith("**better** (McNemar p = ")
    assert svm["accuracy"][4] == "+0.0000" and svm["accuracy"][6].startswith("within noise")
    assert svm["accuracy"][5] != "[+0.0000, +0.0000]"   # other images right: the paired interval has a width
    assert text.index("| cnn |") < text.index("| svm |")  # a decided verdict comes first
    # a model whose predictions did not change is one name on one line, not five rows of zeros
    assert table_rows(text, "adaboost") == {}
    assert "Unchanged (the same prediction for every test image and seed): `adaboost`." in text
    # one more test image: the verdict is on the 20 images both revisions hold out
    assert ("**Test split changed** for `unet`: paired on the 20 test images both revisions hold out "
            "(base 20, head 21)") in text
    head_dice = (np.linspace(0.4, 0.9, 21)[:20] + 0.05).mean()  # the head's Dice on the 20 shared images
    assert table_rows(text, "unet")["dice"][2:5] == ["0.6500", f"{head_dice:.4f}", f"{head_dice - 0.65:+.4f}"]
    assert table_rows(text, "unet")["dice"][6] == "**better**"
    assert table_rows(text, "elsewhere")["dice"][5:] == ["—", "n/a (unpaired)"]
    assert "**Test split changed** for `elsewhere`: no test image is held out by both revisions" in text
    assert "Added: `new`." in text and "Removed: `old`." in text
    assert "time" not in text.lower()


@pytest.mark.skipif(shutil.which("dvc") is None, reason="needs the dvc command")
def test_report_without_prediction_files_says_so(repo):
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    text = report.build_report("main", settings=FAST)
    assert "No prediction files in `reports/predictions/`" in text
    assert "No parameter changed." in text
    assert "No plot data changed." in text


def test_base_file_falls_back_to_git_show_when_dvc_cannot_serve_it(monkeypatch):
    import dvc.api
    from dvc.exceptions import DvcException

    def refuse(*args, **kwargs):
        raise DvcException("no cache")

    calls = []

    def runner(cmd):
        calls.append(list(cmd))
        return report.Result(0, "seed,image,source,dice,iou,hd95\n", "")

    monkeypatch.setattr(dvc.api, "open", refuse)
    path = report.PurePosixPath("reports/predictions/unet.csv")
    assert report.read_at_revision(path, "v1", runner) == "seed,image,source,dice,iou,hd95\n"
    assert calls == [["git", "show", "v1:reports/predictions/unet.csv"]]


def test_unknown_base_revision_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    git(tmp_path, "init", "-q")
    with pytest.raises(report.ReportError, match="--base 'no-such-branch' is not a commit of this repository"):
        report.build_report("no-such-branch")


@pytest.mark.skipif(shutil.which("dvc") is None, reason="needs the dvc command")
def test_base_outputs_missing_from_the_cache_give_one_line_that_says_how_to_get_them(repo, capsys):
    """A reviewer's fresh clone: the base revision's predictions are in no cache and there is no remote."""
    labels = labelled_images()
    predictions = repo / "reports/predictions"
    write_predictions(predictions, cnn=classifier(labels, right_on(140)))
    commit_base(repo, predictions)
    shutil.rmtree(repo / ".dvc" / "cache")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--base", "main", "--resamples", "50"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "neither in this clone's DVC cache nor on a DVC remote" in err
    assert "git checkout main && dvc pull reports/predictions" in err


def test_report_runs_the_dvc_beside_its_interpreter(monkeypatch, tmp_path):
    """Without an activated venv, PATH may hold no dvc: the one installed beside the interpreter is used."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "dvc").write_text("#!/bin/sh\necho from-beside $@\n")
    (fake_bin / "dvc").chmod(0o755)
    monkeypatch.setattr(report.sys, "executable", str(fake_bin / "python"))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert report.run_command(["dvc", "params", "diff"]).stdout == "from-beside params diff\n"


@pytest.mark.skipif(shutil.which("dvc") is None, reason="needs the dvc command")
def test_guard_fails_the_check_on_a_watched_worse_verdict_after_writing_the_report(repo, capsys):
    labels = labelled_images()
    predictions = repo / "reports/predictions"
    write_predictions(predictions, cnn=classifier(labels, right_on(170)), svm=classifier(labels, right_on(170)))
    commit_base(repo, predictions)
    write_predictions(predictions, cnn=classifier(labels, right_on(100)), svm=classifier(labels, right_on(100)))
    (repo / "params.yaml").write_text("evaluate:\n  lr: 0.001\nreview:\n  guard_models: [cnn]\n"
                                      "  guard_metrics: [accuracy]\n")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--base", "main", "--out", "report.md", "--guard", "--resamples", "200"])
    assert exit_info.value.code == report.GUARD_FAILED
    text = (repo / "report.md").read_text()
    assert "## Guard" in text and "- **failed**: `cnn` accuracy: worse (0.8500 -> 0.5000" in text
    assert "svm" not in capsys.readouterr().err  # a worse model that is not watched does not fail the check

    (repo / "params.yaml").write_text("evaluate:\n  lr: 0.001\nreview:\n  guard_models: [svm]\n"
                                      "  guard_metrics: [roc_auc]\n")
    write_predictions(predictions, svm=classifier(labels, right_on(170)))
    figures = repo / "reports/evaluate/figures"
    figures.mkdir(parents=True)
    (figures / "unet.png").write_bytes(b"\x89PNG")
    report.main(["--base", "main", "--out", "report.md", "--guard", "--resamples", "200",  # exits 0: returns
                 "--figures", "reports/evaluate"])
    text = (repo / "report.md").read_text()
    assert "Passed: no watched verdict is worse." in text
    assert "![figures/unet](reports/evaluate/figures/unet.png)" in text


def test_guard_refuses_an_unknown_metric(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("review:\n  guard_models: [cnn]\n  guard_metrics: [acuracy]\n")
    with pytest.raises(report.config.ParamsError, match=r"review.guard_metrics \['acuracy'\] are not headline"):
        report.Guard.from_params(params)


@pytest.mark.skipif(shutil.which("dvc") is None, reason="needs the dvc command")
def test_with_cross_validation_the_out_of_fold_verdicts_come_first_and_the_guard_names_them(repo):
    """Out-of-fold predictions (``cv.folds``) give a section of their own before the test split's: a change too
    small to decide on 200 test images is decided on 800 out-of-fold ones."""
    labels, pool = labelled_images(), labelled_images(800)
    predictions = repo / "reports/predictions"
    write_predictions(predictions, cnn=classifier(labels, right_on(150)))
    write_predictions(predictions / cmp.OUT_OF_FOLD_DIR, cnn=classifier(pool, right_on(600, 800)))
    commit_base(repo, predictions)
    shifted = (np.arange(200) >= 20) & (np.arange(200) < 160)   # 5 points worse on other images: within noise
    write_predictions(predictions, cnn=classifier(labels, shifted))
    write_predictions(predictions / cmp.OUT_OF_FOLD_DIR, cnn=classifier(pool, right_on(560, 800)))
    (repo / "params.yaml").write_text("evaluate:\n  lr: 0.001\nreview:\n  guard_models: [cnn]\n"
                                      "  guard_metrics: [accuracy]\n")
    with pytest.raises(SystemExit):
        report.main(["--base", "main", "--out", "report.md", "--guard", "--resamples", "300"])
    text = (repo / "report.md").read_text()
    oof, test = text.index("## Model verdicts: out-of-fold"), text.index("## Model verdicts: test split")
    assert oof < test
    assert table_rows(text[oof:test], "cnn")["accuracy"][6].startswith("**worse**")
    assert table_rows(text[test:], "cnn")["accuracy"][6].startswith("within noise")
    assert "- **failed**: `cnn` (out-of-fold) accuracy: worse (0.7500 -> 0.7000" in text
    assert "`cnn` (test) accuracy" not in text
