"""The documentation stays true: README.md and docs/**/*.md against params.yaml, datasets.yaml, the code and
the console scripts. Fast (no training, no DVC): each check reads the Markdown and the files it names.

What is checked, every failure named as ``<doc>:<line>: <what is missing>``:
- every ``-S key=value`` (``dvc exp run``, in a fenced block or inline code) sets a key of params.yaml
  (``models.<name>.train.<key>`` resolves through the shared ``train`` section when the model does not
  override it), and every ``--set key=value`` of the benchmark scripts likewise;
- every dotted params key in backticks that starts with a section of params.yaml exists;
- every ``medpipe-<x>`` is a console script of pyproject.toml, and every ``--option`` written after it in a
  command is one that its ``--help`` lists;
- every repository path in backticks or in a fenced block (``medpipe/...``, ``stages/...``, ``docs/...``, ...)
  exists, and every ``medpipe.<module>[.<name>]`` names a module (and a name it defines);
- every relative Markdown link resolves (file and, when given, heading anchor);
- every ``dataset=NAME`` is an entry of datasets.yaml (or an example entry shown in the same document,
  which must then be a valid registry entry);
- example ``models:`` entries shown in a document are valid model specs whose architecture exists, and an
  entry shown for a model or dataset that already exists is the one in params.yaml / datasets.yaml;
- README.md is at most 200 lines.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import logging
import re
import signal
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
CODE_SPAN = re.compile(r"`([^`]+)`")


@dataclass
class Doc:
    """A Markdown file split into prose lines (with their inline code spans) and fenced blocks."""

    path: Path
    lines: list[str]
    fenced: dict[int, str] = field(default_factory=dict)      # line number -> fence language ("" if none)
    prose: dict[int, str] = field(default_factory=dict)       # line number -> text outside fences

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    def where(self, lineno: int) -> str:
        return f"{self.name}:{lineno}"

    def paragraphs(self) -> list[tuple[int, str]]:
        """Runs of consecutive prose lines (a code span or link may wrap), each with its first line number."""
        runs: list[tuple[int, list[str]]] = []
        for n in sorted(self.prose):
            if runs and n == runs[-1][0] + len(runs[-1][1]) and self.prose[n].strip():
                runs[-1][1].append(self.prose[n])
            elif self.prose[n].strip():
                runs.append((n, [self.prose[n]]))
        return [(start, "\n".join(lines)) for start, lines in runs]

    def spans(self, pattern: re.Pattern) -> list[tuple[int, re.Match]]:
        """Matches of ``pattern`` in the prose, each with the line number where it starts."""
        return [(start + text.count("\n", 0, m.start()), m)
                for start, text in self.paragraphs() for m in pattern.finditer(text)]

    def code_spans(self) -> list[tuple[int, str]]:
        """Inline code spans of the prose (a wrapped span joined with a space), with their line numbers."""
        return [(n, m.group(1).replace("\n", " ")) for n, m in self.spans(CODE_SPAN)]

    def code_texts(self) -> list[tuple[int, str]]:
        """Everything written as code: inline spans and the lines of fenced blocks."""
        return self.code_spans() + [(n, self.lines[n - 1]) for n in self.fenced]

    def yaml_blocks(self) -> list[tuple[int, object]]:
        """The parsed ```yaml fences, each with the line number of its first line."""
        blocks, start, prev, body = [], None, 0, []
        for n in sorted(self.fenced):
            if self.fenced[n] != "yaml":
                continue
            if start is None or n != prev + 1:
                if start is not None:
                    blocks.append((start, body))
                start, body = n, []
            body.append(self.lines[n - 1])
            prev = n
        if start is not None:
            blocks.append((start, body))
        return [(n, yaml.safe_load("\n".join(body))) for n, body in blocks]


def read_doc(path: Path) -> Doc:
    doc = Doc(path, path.read_text().splitlines())
    fence, lang = None, ""
    for n, line in enumerate(doc.lines, start=1):
        marker = re.match(r"^\s*(`{3,}|~{3,})(.*)$", line)
        if marker and fence is None:
            fence, lang = marker.group(1), marker.group(2).strip().split(" ")[0].lower()
            continue
        if marker and fence is not None and marker.group(1).startswith(fence) and not marker.group(2).strip():
            fence = None
            continue
        if fence is not None:
            doc.fenced[n] = lang
        else:
            doc.prose[n] = line
    return doc


@functools.cache
def docs() -> tuple[Doc, ...]:
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return tuple(read_doc(p) for p in paths if p.is_file())


@functools.cache
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@functools.cache
def registry() -> dict:
    return yaml.safe_load((ROOT / "datasets.yaml").read_text())


def registry_names() -> frozenset[str]:
    return frozenset(registry())


def resolve(tree: dict, key: str) -> bool:
    """Whether the dotted ``key`` exists in the params ``tree``; ``models.<name>.train.<key>`` falls back to
    the shared ``train`` section (a model's ``train:`` overrides only the keys it names)."""
    parts = key.split(".")
    node: object = tree
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        if parts[0] == "models" and len(parts) > 3 and parts[2] == "train" and i >= 2 \
                and isinstance(tree.get("models", {}).get(parts[1]), dict):
            return resolve(tree, ".".join(["train", *parts[3:]]))
        return False
    return True


def example_models(doc: Doc) -> dict[str, tuple[int, dict]]:
    """``models:`` entries shown as examples in the document's yaml fences, with the fence's line number."""
    found = {}
    for n, block in doc.yaml_blocks():
        if isinstance(block, dict) and isinstance(block.get("models"), dict):
            found.update({k: (n, v) for k, v in block["models"].items() if isinstance(v, dict)})
    return found


def example_datasets(doc: Doc) -> dict[str, tuple[int, dict]]:
    """Dataset entries (mappings with a ``reader``) shown as examples in the document's yaml fences."""
    found = {}
    for n, block in doc.yaml_blocks():
        if isinstance(block, dict):
            found.update({k: (n, v) for k, v in block.items() if isinstance(v, dict) and "reader" in v})
    return found


def doc_params(doc: Doc) -> dict:
    """params.yaml with the document's new example models added (a worked example may use its model)."""
    tree = dict(params())
    new = {name: entry for name, (_, entry) in example_models(doc).items() if name not in tree["models"]}
    tree["models"] = {**tree["models"], **new}
    return tree


# ---------------------------------------------------------------------------------------------------------
# params keys


SET_OPTION = re.compile(r"(?:^|\s)(?:-S|--set-param|--set)\s+['\"]?\+?([A-Za-z_][\w.]*)=")


def test_every_set_option_names_a_params_key():
    problems, seen = [], 0
    for doc in docs():
        tree = doc_params(doc)
        for n, text in doc.code_texts():
            for key in SET_OPTION.findall(text):
                seen += 1
                if not resolve(tree, key):
                    problems.append(f"{doc.where(n)}: `-S {key}=...` sets {key!r}, which params.yaml lacks")
    assert seen >= 20, f"only {seen} `-S key=value` options found in the docs: is the parser broken?"
    assert not problems, "\n".join(problems)


DOTTED_KEY = re.compile(r"^\+?([A-Za-z_]\w*(?:\.[A-Za-z_0-9]\w*)+)(?:\s*[:=].*)?$")
FILE_SUFFIXES = (".py", ".md", ".json", ".yaml", ".yml", ".npz", ".csv", ".tsv", ".pt", ".joblib", ".png",
                 ".zip", ".gz", ".db", ".txt", ".html", ".lock", ".toml")


def test_every_dotted_params_key_in_backticks_exists():
    sections = {k for k, v in params().items() if isinstance(v, dict)}
    problems, seen = [], 0
    for doc in docs():
        tree = doc_params(doc)
        for n, span in doc.code_spans():
            match = DOTTED_KEY.match(span.strip())
            if not match:
                continue
            key = match.group(1)
            if key.split(".")[0] not in sections or key.endswith(FILE_SUFFIXES):
                continue
            seen += 1
            if not resolve(tree, key):
                problems.append(f"{doc.where(n)}: `{span}` names params key {key!r}, which params.yaml lacks")
    assert seen >= 20, f"only {seen} dotted params keys found in the docs: is the parser broken?"
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# console scripts


@functools.cache
def console_scripts() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return project["project"]["scripts"]


class _Parsed(BaseException):
    """Raised in place of parsing the command line: carries the entry point's parser out of it."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


@functools.cache
def script_options(name: str) -> frozenset[str]:
    """The options that ``<name> --help`` lists: the entry point runs in-process until it parses its command
    line, and its parser's help is read (no subprocess: importing the package takes seconds)."""

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    target = console_scripts()[name]
    module, _, attr = target.partition(":")
    entry = getattr(importlib.import_module(module), attr)
    sigterm, root = signal.getsignal(signal.SIGTERM), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    original, argparse.ArgumentParser.parse_known_args = argparse.ArgumentParser.parse_known_args, capture
    try:
        entry()
        raise AssertionError(f"{name} ({target}) returned without parsing a command line")
    except _Parsed as parsed:
        help_text = parsed.parser.format_help()
    finally:                                   # the entry point may install a SIGTERM handler and logging
        argparse.ArgumentParser.parse_known_args = original
        signal.signal(signal.SIGTERM, sigterm)
        root.handlers[:], root.level = handlers, level
    return frozenset(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", help_text))


SCRIPT = re.compile(r"(?<![\w/:.-])medpipe-([a-z]+)(?![\w@/:-])")
COMMAND_END = re.compile(r"\s(?:#|\||;|&&|>|<\s)|`")


def test_every_medpipe_command_and_option_exists():
    problems, seen_options = [], 0
    for doc in docs():
        mentions = [(n, line, False) for n, line in doc.prose.items()]
        mentions += [(n, span, True) for n, span in doc.code_spans()]
        mentions += [(n, doc.lines[n - 1], True) for n, lang in doc.fenced.items()
                     if lang in ("bash", "sh", "")]
        for n, text, is_command in mentions:
            for match in SCRIPT.finditer(text):
                name = f"medpipe-{match.group(1)}"
                if name not in console_scripts():
                    problems.append(f"{doc.where(n)}: `{name}` is not a console script of pyproject.toml "
                                    f"(known: {sorted(console_scripts())})")
                    continue
                if not is_command:
                    continue
                rest = text[match.end():]
                end = COMMAND_END.search(rest)
                for option in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", rest[:end.start()] if end else rest):
                    seen_options += 1
                    if option not in script_options(name):
                        problems.append(f"{doc.where(n)}: `{name} {option}`: {name} --help lists no {option}")
    assert seen_options >= 5, f"only {seen_options} medpipe-* options in the docs: is the parser broken?"
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# paths, modules, links


REPO_PATH = re.compile(
    r"(?<![\w./~-])((?:medpipe|stages|benchmarks|tests|docs|\.github)/[\w./-]*\w/?)(?![\w<{*$])")


def test_every_repository_path_exists():
    problems, seen = [], 0
    for doc in docs():
        for n, text in doc.code_texts():
            for path in REPO_PATH.findall(text):
                seen += 1
                if not (ROOT / path).exists():
                    problems.append(f"{doc.where(n)}: path `{path}` does not exist in the repository")
    assert seen >= 20, f"only {seen} repository paths found in the docs: is the parser broken?"
    assert not problems, "\n".join(problems)


MODULE_NAME = re.compile(r"(?<![\w./-])medpipe(?:\.[A-Za-z_]\w*)+")


def defines(source: Path, name: str) -> bool:
    """Whether the module file defines or imports ``name`` at top level."""
    names = set()
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return name in names


def module_problem(dotted: str) -> str | None:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if source.is_file():
            rest = parts[i:]
            if rest and not defines(source, rest[0]):
                return f"{source.relative_to(ROOT)} defines no {rest[0]!r}"
            return None
    return "no such module"


def test_every_medpipe_module_exists():
    problems, seen = [], 0
    for doc in docs():
        for n, text in doc.code_texts():
            for dotted in MODULE_NAME.findall(text):
                seen += 1
                problem = module_problem(dotted)
                if problem:
                    problems.append(f"{doc.where(n)}: `{dotted}`: {problem}")
    assert seen >= 3, f"only {seen} medpipe module names found in the docs: is the parser broken?"
    assert not problems, "\n".join(problems)


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    doc = read_doc(path)
    headings = (re.match(r"^#{1,6}\s+(.*)$", line) for line in doc.prose.values())
    return frozenset(slug(m.group(1)) for m in headings if m)


def test_every_relative_link_resolves():
    problems, seen = [], 0
    for doc in docs():
        for start, text in doc.paragraphs():
            # code spans blanked out (a link inside backticks is not a link), line breaks kept for the numbers
            text = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
            for match in LINK.finditer(text):
                n, target = start + text.count("\n", 0, match.start()), match.group(1)
                if re.match(r"^[a-z]+:", target):
                    continue                                  # http(s):, mailto:
                seen += 1
                file_part, _, anchor = target.partition("#")
                path = (doc.path.parent / file_part).resolve() if file_part else doc.path
                if not path.exists():
                    problems.append(f"{doc.where(n)}: link `{target}`: {file_part} does not exist")
                elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                    problems.append(f"{doc.where(n)}: link `{target}`: {path.relative_to(ROOT)} has no "
                                    f"heading with anchor #{anchor}")
    assert seen >= 10, f"only {seen} relative links found in the docs: is the parser broken?"
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# datasets and example entries


def test_every_dataset_name_is_registered():
    from medpipe.data.registry import DatasetSpec

    problems, seen = [], 0
    for doc in docs():
        examples = example_datasets(doc)
        for name, (n, entry) in examples.items():
            if name in registry_names():
                if entry != registry()[name]:
                    problems.append(f"{doc.where(n)}: the datasets.yaml entry {name!r} shown here differs "
                                    "from the one in datasets.yaml")
                continue
            try:
                DatasetSpec(name=name, **entry)
            except Exception as err:                       # pydantic's ValidationError, TypeError
                problems.append(f"{doc.where(n)}: example datasets.yaml entry {name!r} is invalid: {err}")
        for n, text in list(doc.prose.items()) + [(n, doc.lines[n - 1]) for n in doc.fenced]:
            for name in re.findall(r"(?<![\w.])dataset=([A-Za-z0-9_][\w.-]*\w)", text):
                seen += 1
                if name not in registry_names() and name not in examples:
                    problems.append(f"{doc.where(n)}: `dataset={name}`: no such entry in datasets.yaml "
                                    f"(entries: {sorted(registry_names())})")
    assert seen >= 5, f"only {seen} `dataset=NAME` found in the docs: is the parser broken?"
    assert not problems, "\n".join(problems)


def test_example_model_entries_are_valid():
    from medpipe.training.config import ClassifierSpec

    problems = []
    for doc in docs():
        for name, (n, entry) in example_models(doc).items():
            if name in params()["models"]:
                if entry != params()["models"][name]:
                    problems.append(f"{doc.where(n)}: the models.{name} entry shown here differs from "
                                    "params.yaml's")
                continue
            try:
                ClassifierSpec(**entry)
            except Exception as err:                       # pydantic's ValidationError
                problems.append(f"{doc.where(n)}: example model {name!r} is invalid: {err}")
                continue
            unknown = set(entry.get("train") or {}) - set(params()["train"])
            if unknown:
                problems.append(f"{doc.where(n)}: example model {name!r} overrides train keys "
                                f"{sorted(unknown)} that the train section of params.yaml lacks")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# the README itself


def test_readme_is_a_short_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md: {len(lines)} lines, at most {README_MAX_LINES}"


@pytest.mark.parametrize("command", [
    "python -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && dvc repro",
    "python -m pytest -q",
])
def test_readme_shows_the_two_commands(command):
    assert command in (ROOT / "README.md").read_text(), f"README.md: the command `{command}` is missing"
