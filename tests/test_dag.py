"""dvc.yaml states exactly what each stage reads: its medpipe modules are its script's import closure.

The closure follows every ``import``/``from ... import`` of a ``medpipe`` module, at any depth and in
any function (a lazy import runs too), plus the ``__init__.py`` of every package on the way; imports under
``if TYPE_CHECKING:`` never run and are left out. A stage
that lists a module it does not import reruns for nothing; one that omits a module it imports does
not rerun when that module changes. Either fails here with the exact list to paste.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """``medpipe.a.b`` -> medpipe/a/b.py or medpipe/a/b/__init__.py (None when it is not a module)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): a block that only type checkers read."""
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def run_time_nodes(tree: ast.AST):
    """Every node of ``tree`` that can run: all of them but the bodies of ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if type_checking_only(node):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every medpipe module a file imports, as dotted names (``from medpipe.x import y`` may name module y)."""
    names: set[str] = set()
    for node in run_time_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "medpipe"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "medpipe":
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names
                      if module_file(f"{node.module}.{a.name}", root)}
    return names


def closure(script: Path, root: Path = ROOT) -> set[str]:
    """The medpipe files (relative paths) a stage script runs, with their packages' ``__init__.py``."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        for name in imported_modules(path, root):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:i]), root)
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return {str(p.relative_to(root)) for p in seen}


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


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_closure_follows_lazy_and_nested_imports_but_not_type_checking_ones(tmp_path):
    """The closure sees a function-level import and the packages on the way, and skips what only type checkers
    import (the check is not vacuous)."""
    write_tree(tmp_path, {
        "stages/s.py": "from medpipe.a.top import f\n",
        "medpipe/__init__.py": "", "medpipe/a/__init__.py": "", "medpipe/b/__init__.py": "",
        "medpipe/c/__init__.py": "", "medpipe/d/__init__.py": "",
        "medpipe/a/top.py": (
            "from typing import TYPE_CHECKING\nimport typing\n\n"
            "if TYPE_CHECKING:\n    from medpipe.c.hint import Hint\nelse:\n    from medpipe.d import runs\n\n"
            "if typing.TYPE_CHECKING:\n    import medpipe.c.other\n\n"
            "def f():\n    from medpipe.b import lazy\n"),
        "medpipe/b/lazy.py": "", "medpipe/c/hint.py": "", "medpipe/c/other.py": "", "medpipe/d/runs.py": "",
    })
    assert closure(tmp_path / "stages/s.py", tmp_path) == {
        "medpipe/__init__.py", "medpipe/a/__init__.py", "medpipe/a/top.py", "medpipe/b/__init__.py",
        "medpipe/b/lazy.py", "medpipe/d/__init__.py", "medpipe/d/runs.py"}

    found = closure(ROOT / "stages" / "train.py")
    assert "medpipe/training/runner.py" in found             # imported by training/stage.py
    assert "medpipe/models/__init__.py" in found             # the package a module lives in runs first
    assert "medpipe/evaluation/stage.py" not in found        # training never imports the evaluation
    assert "medpipe/segmentation/config.py" not in closure(ROOT / "medpipe/segmentation/postprocess.py")


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
