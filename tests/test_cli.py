"""Every console script explains itself in plain words: --help gives each option a sentence and shows no
reStructuredText markup; --version prints the package version."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import medpipe

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    module, func = SCRIPTS[name].split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; {func}()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_is_plain_and_explains_every_option(name):
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "``" not in text and ":mod:" not in text and ":func:" not in text, text
    options = re.findall(r"^  (--[a-z-]+)(.*)$", text, flags=re.M)
    assert options, text
    undocumented = [opt for opt, rest in options if not rest.strip() and not re.search(
        rf"^  {re.escape(opt)}[^\n]*\n {{20,}}\S", text, flags=re.M)]
    assert not undocumented, f"{name}: options without a help text: {undocumented}"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_version(name):
    result = run_script(name, "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"{name} {medpipe.__version__}", result


def test_a_stage_option_with_a_default_may_be_left_out_and_is_typed(monkeypatch):
    """A paths field with a default (`fold: int | None = None`) is an optional, typed option; the others stay
    required, so a hold-out stage's `cmd:` needs no `--fold` and a fold stage's `--fold 3` arrives as the int 3."""
    import dataclasses

    from medpipe import cli

    @dataclasses.dataclass(frozen=True)
    class Paths:
        out: Path
        fold: int | None = None

    seen = []
    monkeypatch.setattr(cli.config, "load_params", lambda path: {})
    for argv, expected in ((["--out", "x"], None), (["--out", "x", "--fold", "3"], 3)):
        monkeypatch.setattr(sys, "argv", ["stage", *argv])
        cli.stage_main(lambda params, paths: seen.append(paths), Paths, "a stage")
        assert seen[-1] == Paths(Path("x"), expected)
    monkeypatch.setattr(sys, "argv", ["stage", "--fold", "3"])
    with pytest.raises(SystemExit):   # --out is required
        cli.stage_main(lambda params, paths: None, Paths, "a stage")
