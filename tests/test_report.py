"""medpipe-report: a Markdown PR report from real `dvc params/metrics diff` in a throwaway repository."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from medpipe import report


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("dvc") is None, reason="needs the dvc command")
def test_report_shows_params_metrics_and_plots_changed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "config", "user.email", "t@example.com")
    git(tmp_path, "config", "user.name", "t")
    subprocess.run(["dvc", "init", "-q"], check=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: 'true'\n    params: [evaluate]\n"
        "    metrics: [{metrics/evaluate.json: {cache: false}}]\n"
        "    plots: [{plots/evaluate/roc: {cache: false, x: fpr, y: tpr}}]\n"
    )
    (tmp_path / "params.yaml").write_text("evaluate:\n  lr: 0.001\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "plots/evaluate/roc").mkdir(parents=True)
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps({"cnn": {"accuracy": 0.8}, "svm": {"accuracy": 0.7}}))
    (tmp_path / "plots/evaluate/roc/cnn.csv").write_text("fpr,tpr\n0,0\n1,1\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "base")
    (tmp_path / "params.yaml").write_text("evaluate:\n  lr: 0.0001\n")
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps({"cnn": {"accuracy": 0.85}, "svm": {"accuracy": 0.7}}))
    (tmp_path / "plots/evaluate/roc/cnn.csv").write_text("fpr,tpr\n0,0\n0.1,0.9\n1,1\n")
    (tmp_path / "metrics/summary.md").write_text("# Test-split evaluation\n\n| model | accuracy |\n")

    text = report.build_report("main", plots_out=tmp_path / "html")
    assert "vs `main`" in text
    assert "evaluate.lr" in text and "0.0001" in text  # dvc params diff --md
    assert "cnn.accuracy" in text and "0.85" in text and "0.05" in text  # dvc metrics diff --md, with the change
    assert "svm.accuracy" not in text  # unchanged metrics stay out
    assert "`plots/evaluate/roc/cnn.csv`" in text
    assert "## Test-split evaluation" in text  # the workspace summary, nested one level down
    assert (tmp_path / "html/index.html").is_file()


def test_unknown_base_revision_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    git(tmp_path, "init", "-q")
    with pytest.raises(report.ReportError, match="rev-parse"):
        report.build_report("no-such-branch")
