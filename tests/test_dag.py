"""dvc.yaml states exactly what each stage reads: its medpipe modules are its script's import closure.

The closure follows every ``import``/``from ... import`` of a ``medpipe`` module, at any depth and in
any function (a lazy import runs too), plus the ``__init__.py`` of every package on the way. A stage
that lists a module it does not import reruns for nothing; one that omits a module it imports does
not rerun when that module changes. Either fails here with the exact list to paste.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """``medpipe.a.b`` -> medpipe/a/b.py or medpipe/a/b/__init__.py (None when it is not a module)."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every medpipe module a file imports, as dotted names (``from medpipe.x import y`` may name module y)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "medpipe"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "medpipe":
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return names


def closure(script: Path) -> set[str]:
    """The medpipe files (relative paths) a stage script runs, with their packages' ``__init__.py``."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        for name in imported_modules(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:i]))
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return {str(p.relative_to(ROOT)) for p in seen}


def declared(deps: list) -> set[str]:
    """The medpipe .py files a stage's deps name (a folder stands for every module in it)."""
    files: set[str] = set()
    for dep in deps:
        path = ROOT / dep
        if not dep.startswith("medpipe"):
            continue
        if path.is_dir():
            files |= {str(p.relative_to(ROOT)) for p in path.rglob("*.py")}
        else:
            files.add(dep)
    return files


def stage_definitions() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def script_of(stage: dict) -> Path:
    module = stage["cmd"].split("python -m ", 1)[1].split()[0]
    return ROOT / (module.replace(".", "/") + ".py")


@pytest.mark.parametrize("name", sorted(stage_definitions()))
def test_stage_lists_exactly_the_modules_it_imports(name):
    stage = stage_definitions()[name]
    script = script_of(stage)
    assert str(script.relative_to(ROOT)) in stage["deps"], f"{name}: its script {script} is not a dependency"
    expected, listed = closure(script), declared(stage["deps"])
    missing, extra = sorted(expected - listed), sorted(listed - expected)
    assert not missing and not extra, (
        f"stage {name}: dvc.yaml omits {missing} and lists {extra} it does not import; its deps should name:\n"
        + "\n".join(f"      - {m}" for m in sorted(expected))
    )


def test_closure_follows_lazy_and_nested_imports(tmp_path, monkeypatch):
    """The closure sees a function-level import and the packages on the way (the check is not vacuous)."""
    found = closure(ROOT / "stages" / "train.py")
    assert "medpipe/training/stage.py" in found
    assert "medpipe/training/runner.py" in found             # imported by training/stage.py
    assert "medpipe/models/__init__.py" in found             # the package a module lives in runs first
    assert "medpipe/evaluation/stage.py" not in found        # training never imports the evaluation


def test_each_training_stage_reaches_only_its_own_models():
    """Classifiers, the U-Net, the classical models and the pixel classifier train in separate closures."""
    classifiers = closure(ROOT / "stages" / "train.py")
    unet = closure(ROOT / "stages" / "train_segmenter.py")
    classical = closure(ROOT / "stages" / "train_classical.py")
    pixel = closure(ROOT / "stages" / "train_pixel_classifier.py")
    assert not any(m.startswith("medpipe/segmentation/") for m in classifiers)
    assert "medpipe/segmentation/unet.py" in unet and "medpipe/training/classify.py" not in unet
    assert not any(m.startswith(("medpipe/segmentation/", "medpipe/training/")) for m in classical)
    assert "medpipe/segmentation/pixel_classifier.py" in pixel
    assert not any(m.startswith("medpipe/training/") for m in pixel) and "medpipe/segmentation/unet.py" not in pixel
