"""``medpipe-report``: a Markdown pull-request report against a base revision, in the manner of CML.

    medpipe-report                        # workspace vs main, to stdout
    medpipe-report --base HEAD~1 --out report.md --plots-out report_plots

Sections: ``dvc params diff --md`` (what changed), then the verdict table: every model of the
workspace's ``reports/predictions/`` against the same model at the base revision, on each headline
metric, by a paired bootstrap over the test images (:mod:`medpipe.evaluation.compare`): base, head,
difference, its interval and the verdict (better / worse / within noise), models with a verdict
other than "within noise" first. Models on one side only are listed as added or removed. If a change
moved the test split (another image size, near-duplicate distance or dataset version), the verdict is
on the test images both revisions hold out, matched by source file and label, and the report says how
many; with none shared it shows unpaired values. Then the plot data files that changed and, with
``--plots-out``, the HTML of ``dvc plots diff``. Paste the file into the pull request or post it (``gh pr comment --body-file report.md``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np

import medpipe
from medpipe import cli, config
from medpipe.errors import UserError
from medpipe.evaluation.compare import (
    CLASSIFIER_METRICS,
    NOT_TRAINED_FILE,
    OUT_OF_FOLD_DIR,
    SEGMENTER_METRICS,
    WITHIN_NOISE,
    Comparison,
    Predictions,
    compare,
    load_predictions,
    point_estimates,
    same_test_split,
    shared_test_images,
)
from medpipe.evaluation.summary import not_trained_lines
from medpipe.io import read_json

PREDICTIONS_DIR = Path("reports/predictions")
GUARD_FAILED = 3  # the exit status of `medpipe-report --guard` when a guarded verdict is `worse`


class ReportError(UserError, RuntimeError):
    """A command the report needs failed (not a git/DVC repository, unknown base revision, ...)."""


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str]], Result]


@dataclass(frozen=True)
class Settings:
    """How the paired bootstrap of the verdict table is run."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0


def dvc_executable() -> str:
    """The ``dvc`` installed beside this interpreter (a venv need not be activated), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else "dvc"


def run_command(cmd: Sequence[str]) -> Result:
    cmd = [dvc_executable(), *cmd[1:]] if cmd and cmd[0] == "dvc" else list(cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ReportError(f"`{cmd[0]}` was not found: install medpipe's requirements (pip install -r "
                          "requirements.txt) in the environment that runs medpipe-report") from None
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _checked(runner: Runner, cmd: Sequence[str]) -> str:
    result = runner(cmd)
    if result.returncode != 0:
        raise ReportError(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


# --------------------------------------------------------------------------- files at the base revision


def _not_in_cache(path: PurePosixPath, rev: str) -> ReportError:
    return ReportError(
        f"the outputs of `{rev}` ({path}) are neither in this clone's DVC cache nor on a DVC remote it can "
        f"reach: get them with `git checkout {rev} && dvc pull {path}` (or `dvc repro evaluate` there), "
        "then `git checkout -` and run medpipe-report again"
    )


def _missing_data_errors() -> tuple[type[Exception], ...]:
    """What DVC raises for an output it knows at a revision but whose data it cannot find."""
    from dvc_data.index import DataIndexError

    return (DataIndexError,)


def _dvc_errors() -> tuple[type[Exception], ...]:
    """What DVC raises for a path or revision it cannot serve (then git is asked instead)."""
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    return DvcException, SCMError, OSError


def read_at_revision(path: PurePosixPath, rev: str, runner: Runner = run_command) -> str | None:
    """The text of ``path`` at ``rev``: through DVC (tracked outputs), else ``git show``; None if absent."""
    import dvc.api

    try:
        with dvc.api.open(path.as_posix(), rev=rev) as handle:
            return handle.read()
    except _missing_data_errors():
        raise _not_in_cache(path, rev) from None
    except _dvc_errors():
        result = runner(["git", "show", f"{rev}:{path.as_posix()}"])
        return result.stdout if result.returncode == 0 else None


def files_at_revision(directory: PurePosixPath, rev: str, runner: Runner = run_command) -> list[str]:
    """File names directly under ``directory`` at ``rev`` (DVC-tracked or in git); empty if it is absent."""
    from dvc.api import DVCFileSystem

    try:
        entries = DVCFileSystem(".", rev=rev).ls(directory.as_posix(), detail=True)
        return sorted(PurePosixPath(e["name"]).name for e in entries if e["type"] == "file")
    except _missing_data_errors():
        raise _not_in_cache(directory, rev) from None
    except _dvc_errors():
        result = runner(["git", "ls-tree", "--name-only", rev, f"{directory.as_posix()}/"])
        if result.returncode != 0:
            return []
        return sorted(PurePosixPath(line).name for line in result.stdout.splitlines())


def _models(names: Sequence[str]) -> list[str]:
    return sorted(PurePosixPath(n).stem for n in names if n.endswith(".csv"))


# --------------------------------------------------------------------------- the verdict table


@dataclass(frozen=True)
class ModelResult:
    """One model present at both revisions: its comparisons, paired or (no test image shared) not.

    ``shared``: where the test split changed, (images both sides hold out, base's test images, head's):
    the comparisons are then on the shared images only.
    """

    model: str
    comparisons: tuple[Comparison, ...]
    paired: bool
    shared: tuple[int, int, int] | None = None
    scope: str = ""      # with cross-validation, which images: " (out-of-fold)" or " (test)"

    @property
    def decided(self) -> bool:
        """Whether some metric is better or worse (such models are listed first)."""
        return self.paired and any(c.verdict != WITHIN_NOISE for c in self.comparisons)


def _unpaired(base: Predictions, head: Predictions) -> tuple[Comparison, ...]:
    """Point values of both sides without interval or verdict (the test images differ)."""
    if base.kind != head.kind:
        return ()
    a, b = point_estimates(base), point_estimates(head)
    nan = float("nan")
    return tuple(Comparison(m, a[m], b[m], b[m] - a[m], nan, nan, "n/a") for m in a)


def identical(base: Predictions, head: Predictions) -> bool:
    """The same predictions for every image and seed: nothing about this model changed."""
    if (base.kind, base.seeds) != (head.kind, head.seeds) or not same_test_split(base, head):
        return False
    if (base.proba is None) != (head.proba is None) or set(base.scores) != set(head.scores):
        return False
    arrays = [(base.proba, head.proba)] if base.proba is not None else []
    arrays += [(base.scores[m], head.scores[m]) for m in base.scores]
    return all(np.array_equal(a, b, equal_nan=True) for a, b in arrays)


def compare_model(model: str, base: Predictions, head: Predictions, settings: Settings) -> ModelResult:
    """Paired verdicts on the headline metrics: on the whole test split if both sides have the same one,
    else on the test images both hold out; unpaired values if they share none (or are of other kinds)."""
    shared = None
    if not same_test_split(base, head):
        if base.kind != head.kind or base.class_names != head.class_names:
            return ModelResult(model, _unpaired(base, head), paired=False)
        base_shared, head_shared = shared_test_images(base, head)
        if len(base_shared.images) == 0:
            return ModelResult(model, _unpaired(base, head), paired=False, shared=(0, len(base.images),
                                                                                     len(head.images)))
        shared = (len(base_shared.images), len(base.images), len(head.images))
        base, head = base_shared, head_shared
    result = compare(base, head, resamples=settings.resamples, seed=settings.seed,
                     confidence=settings.confidence)
    return ModelResult(model, tuple(result.values()), paired=True, shared=shared)


def _number(value: float, signed: bool = False) -> str:
    if value != value:  # NaN: undefined on this split
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _verdict_cell(c: Comparison, paired: bool) -> str:
    if not paired:
        return "n/a (unpaired)"
    text = c.verdict if c.verdict == WITHIN_NOISE else f"**{c.verdict}**"
    return text if c.p_value is None else f"{text} (McNemar p = {c.p_value:.3g})"


def _row(result: ModelResult, c: Comparison) -> str:
    metric = f"{c.metric} ↓" if c.lower_is_better else c.metric
    interval = f"[{_number(c.ci_low, True)}, {_number(c.ci_high, True)}]" if result.paired else "—"
    cells = [result.model, metric, _number(c.base), _number(c.head), _number(c.difference, True), interval,
             _verdict_cell(c, result.paired)]
    return "| " + " | ".join(cells) + " |"


def verdict_table(results: Sequence[ModelResult], confidence: float) -> list[str]:
    """Markdown table lines, models with a better/worse verdict first, then by name."""
    header = ["model", "metric", "base", "head", "difference", f"{confidence:.0%} interval", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in sorted(results, key=lambda r: (not r.decided, r.model)):
        lines += [_row(result, c) for c in result.comparisons]
    return lines


@dataclass(frozen=True)
class Scope:
    """Which predictions a verdict section compares, and how it names them."""

    heading: str
    image: str           # "test image" or "out-of-fold image"
    split: str           # what moves the images: "Test split" or "Fold assignment"
    label: str = ""      # appended to a model's name by the guard

    @property
    def images(self) -> str:
        return f"{self.image}s"


HOLD_OUT = Scope("## Model verdicts", "test image", "Test split")
FOLD_TEST = Scope("## Model verdicts: test split (the average of the fold models)", "test image", "Test split",
                  " (test)")
OUT_OF_FOLD = Scope("## Model verdicts: out-of-fold (every train + val image, by the fold model that held it out)",
                    "out-of-fold image", "Fold assignment", " (out-of-fold)")


def verdict_section(
    base: str, predictions_dir: Path, settings: Settings, runner: Runner = run_command, scope: Scope = HOLD_OUT
) -> tuple[list[str], list[ModelResult]]:
    """The "Model verdicts" section (the verdict table, the split-changed note, added and removed models) and
    the paired results it shows."""
    directory = PurePosixPath(predictions_dir.as_posix())
    head_models = _models([p.name for p in predictions_dir.glob("*.csv")])
    base_models = _models(files_at_revision(directory, base, runner))
    lines = [scope.heading, ""]
    if not head_models and not base_models:
        return lines + [f"No prediction files in `{directory}/` (the `evaluate` stage writes them).", ""], []
    results, unchanged = [], []
    for model in sorted(set(head_models) & set(base_models)):
        path = directory / f"{model}.csv"
        text = read_at_revision(path, base, runner)
        if text is None:
            raise _not_in_cache(directory, base)
        base_pred = load_predictions(text, name=f"{path} at {base}")
        head_pred = load_predictions(predictions_dir / f"{model}.csv")
        if identical(base_pred, head_pred):
            unchanged.append(model)
        else:
            results.append(replace(compare_model(model, base_pred, head_pred, settings), scope=scope.label))
    lines += _verdict_body(base, settings, results, scope)
    if unchanged:
        lines += ["", f"Unchanged (the same prediction for every {scope.image} and seed): "
                  + ", ".join(f"`{m}`" for m in unchanged) + "."]
    lines += [*_added_removed(head_models, base_models), ""]
    untrained = predictions_dir / NOT_TRAINED_FILE
    lines += not_trained_lines(read_json(untrained)) if untrained.is_file() else []
    return lines, results


def _verdict_body(base: str, settings: Settings, results: Sequence[ModelResult], scope: Scope) -> list[str]:
    if not results:
        return []
    lines = [
        f"Workspace minus `{base}` on the same {scope.images}; {settings.confidence:.0%} paired-bootstrap "
        f"interval ({settings.resamples} resamples, metrics averaged over training seeds). better / worse: "
        "the interval excludes 0 on that side; ↓: lower is better.",
        "",
    ]
    by_shared: dict[tuple[int, int, int], list[str]] = {}
    for result in results:
        if result.shared is not None:
            by_shared.setdefault(result.shared, []).append(f"`{result.model}`")
    for shared, models in by_shared.items():
        lines += [_split_changed_note(", ".join(models), *shared, scope), ""]
    unmatched = [f"`{r.model}`" for r in results if not r.paired and r.shared is None]
    if unmatched:
        note = (f"No paired verdict for {', '.join(unmatched)}: the two sides are not the same kind of model "
                "or predict other classes; unpaired values shown.")
        lines += [note, ""]
    return lines + verdict_table(results, settings.confidence)


def _split_changed_note(models: str, shared: int, n_base: int, n_head: int, scope: Scope = HOLD_OUT) -> str:
    if shared == 0:
        return (f"**{scope.split} changed** for {models}: no {scope.image} is held out by both revisions "
                f"(base {n_base}, head {n_head}), so no paired verdict is possible; unpaired values shown.")
    return (f"**{scope.split} changed** for {models}: paired on the {shared} {scope.images} both revisions "
            f"hold out (base {n_base}, head {n_head}); base and head values are on those images.")


def _added_removed(head_models: Sequence[str], base_models: Sequence[str]) -> list[str]:
    lines = []
    for label, models in (("Added", set(head_models) - set(base_models)),
                          ("Removed", set(base_models) - set(head_models))):
        if models:
            lines += ["", f"{label}: {', '.join(f'`{m}`' for m in sorted(models))}."]
    return lines


# --------------------------------------------------------------------------- the guard


@dataclass(frozen=True)
class Guard:
    """The (model, metric) verdicts a pull request must not make worse (``review`` in params.yaml)."""

    models: tuple[str, ...]
    metrics: tuple[str, ...]

    @classmethod
    def from_params(cls, path: Path) -> Guard:
        review = config.load_params(path).get("review") or {}
        unknown_keys = sorted(set(review) - {"guard_models", "guard_metrics"})
        if unknown_keys:
            raise config.ParamsError(f"{path}: review has unknown key(s) {unknown_keys}; known: guard_models, "
                                     "guard_metrics")
        models, metrics = review.get("guard_models") or [], review.get("guard_metrics") or []
        if not all(isinstance(m, str) for m in [*models, *metrics]):
            raise config.ParamsError(f"{path}: review.guard_models and review.guard_metrics are lists of names")
        known = (*CLASSIFIER_METRICS, *SEGMENTER_METRICS)
        unknown = sorted(set(metrics) - set(known))
        if unknown:
            raise config.ParamsError(f"{path}: review.guard_metrics {unknown} are not headline metrics {list(known)}")
        return cls(tuple(models), tuple(metrics))

    def failures(self, results: Sequence[ModelResult]) -> list[str]:
        """One line per guarded paired verdict that is `worse`."""
        return [f"`{r.model}`{r.scope} {c.metric}: worse ({_number(c.base)} -> {_number(c.head)}, interval "
                f"[{_number(c.ci_low, True)}, {_number(c.ci_high, True)}])"
                for r in results if r.paired and r.model in self.models
                for c in r.comparisons if c.metric in self.metrics and c.verdict == "worse"]

    def section(self, results: Sequence[ModelResult]) -> list[str]:
        failed = self.failures(results)
        watched = f"{', '.join(f'`{m}`' for m in self.models)} on {', '.join(self.metrics)}"
        lines = ["## Guard", "", f"Watched (params.yaml `review`): {watched}.", ""]
        return lines + ([f"- **failed**: {line}" for line in failed] or ["Passed: no watched verdict is worse."])


# --------------------------------------------------------------------------- the rest of the report


def changed_plot_files(runner: Runner, base: str, plots_dir: str = "plots") -> list[str]:
    """Plot data files tracked by git that differ between ``base`` and the workspace."""
    out = _checked(runner, ["git", "diff", "--name-only", base, "--", plots_dir])
    return sorted(line for line in out.splitlines() if line.strip())


def figures_section(folder: Path | None, most: int = 8) -> list[str]:
    """Markdown images of the PNG figures under ``folder`` (CML uploads the files a comment links)."""
    if folder is None:
        return []
    # the figures a reviewer looks at first: confusion matrices, then the rest (reliability, contours, Grad-CAM)
    pngs = sorted(folder.rglob("*.png"), key=lambda p: ("confusion" not in p.name, "reliability" not in p.name, p))
    links = [f"![{png.relative_to(folder).with_suffix('').as_posix()}]({png.as_posix()})" for png in pngs[:most]]
    more = ["", f"{len(pngs) - most} more under `{folder}/`."] if len(pngs) > most else []
    return ["", "## Figures", "", *(links or [f"No PNG figure under `{folder}/`."]), *more]


def plots_section(runner: Runner, base: str, plots_out: Path | None) -> list[str]:
    """Changed plot files, one line per folder, and the `dvc plots diff` HTML when asked for."""
    by_folder: dict[str, list[str]] = {}
    for path in changed_plot_files(runner, base):
        by_folder.setdefault(str(PurePosixPath(path).parent), []).append(PurePosixPath(path).name)
    lines = ["## Plots changed", ""]
    listed = [f"- `{folder}/`: {', '.join(names)}" for folder, names in by_folder.items()]
    lines += listed or ["No plot data changed."]
    if plots_out is not None:
        _checked(runner, ["dvc", "plots", "diff", base, "--out", str(plots_out)])
        lines += ["", f"All plots, `{base}` and workspace overlaid: `{plots_out / 'index.html'}`"]
    return lines


def verdict_sections(base: str, predictions_dir: Path, settings: Settings, runner: Runner = run_command
                     ) -> tuple[list[str], list[ModelResult]]:
    """The verdict sections and their results: with cross-validation on either side, the out-of-fold verdicts
    (the powerful comparison, on every train + val image) then the test split's (the final one); else the
    test split's alone, as before."""
    out_of_fold = predictions_dir / OUT_OF_FOLD_DIR
    if not out_of_fold.is_dir() and not files_at_revision(PurePosixPath(out_of_fold.as_posix()), base, runner):
        return verdict_section(base, predictions_dir, settings, runner)
    oof_lines, oof_results = verdict_section(base, out_of_fold, settings, runner, OUT_OF_FOLD)
    test_lines, test_results = verdict_section(base, predictions_dir, settings, runner, FOLD_TEST)
    return oof_lines + test_lines, oof_results + test_results


@dataclass(frozen=True)
class Report:
    text: str                   # the Markdown
    guard_failures: list[str]   # the guarded verdicts that are `worse` (empty without a guard)


def build_report(base: str, runner: Runner = run_command, predictions_dir: Path = PREDICTIONS_DIR,
                 plots_out: Path | None = None, settings: Settings = Settings()) -> str:
    """The whole Markdown report of the workspace against ``base`` (run from the repository root)."""
    return make_report(base, runner, predictions_dir, plots_out, settings).text


def make_report(base: str, runner: Runner = run_command, predictions_dir: Path = PREDICTIONS_DIR,
                plots_out: Path | None = None, settings: Settings = Settings(), guard: Guard | None = None,
                figures: Path | None = None) -> Report:
    """The report and, with a ``guard``, its section and the guarded verdicts that are worse."""
    if runner(["git", "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"]).returncode != 0:
        raise ReportError(f"--base {base!r} is not a commit of this repository: name a branch, tag or commit "
                          "(`git fetch` it first if it lives on a remote)")
    head = _checked(runner, ["git", "rev-parse", "--short", "HEAD"]).strip()
    params = _checked(runner, ["dvc", "params", "diff", base, "--md"]).strip()
    if len(params.splitlines()) <= 2:  # a table header without rows
        params = ""
    verdicts, results = verdict_sections(base, Path(predictions_dir), settings, runner)
    lines = [
        f"# medpipe report: workspace (HEAD {head}) vs `{base}`", "",
        *(guard.section(results) + [""] if guard else []),
        "## Parameters changed", "", params or "No parameter changed.", "",
        *verdicts,
        *plots_section(runner, base, plots_out),
        *figures_section(figures),
    ]
    return Report("\n".join(lines) + "\n", guard.failures(results) if guard else [])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="medpipe-report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill("A Markdown report of the workspace against a base revision: the parameters that changed, "
                    "then for every model and headline metric the base and head values, their difference, a "
                    "paired-bootstrap interval over the test images and a verdict (better, worse, within noise), "
                    "then the plots that changed.", 100),
        epilog="examples:\n  medpipe-report --base main --out report.md\n"
               "  medpipe-report --base HEAD~1 --plots-out report_plots")
    parser.add_argument("--version", action="version", version=f"%(prog)s {medpipe.__version__}")
    parser.add_argument("--base", default="main", help="git revision to compare with (default: main)")
    parser.add_argument("--out", type=Path, help="write the Markdown here (default: stdout)")
    parser.add_argument("--predictions", type=Path, default=PREDICTIONS_DIR,
                        help=f"per-model prediction CSVs of the evaluate stage (default: {PREDICTIONS_DIR})")
    parser.add_argument("--resamples", type=int, default=Settings.resamples,
                        help="paired-bootstrap resamples")
    parser.add_argument("--confidence", type=float, default=Settings.confidence, help="interval level")
    parser.add_argument("--seed", type=int, default=Settings.seed, help="seed of the bootstrap draws")
    parser.add_argument("--plots-out", type=Path, help="also render `dvc plots diff` HTML into this folder")
    parser.add_argument("--guard", action="store_true",
                        help=f"exit with status {GUARD_FAILED} (after writing the report) when a verdict that "
                             "params.yaml's `review` section watches is worse")
    parser.add_argument("--figures", type=Path,
                        help="add the PNG figures under this folder as images (e.g. reports/evaluate)")
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE),
                        help="the params file whose `review` section --guard reads (default: params.yaml)")
    args = parser.parse_args(argv)

    def go() -> None:
        settings = Settings(args.resamples, args.confidence, args.seed)
        guard = Guard.from_params(args.params) if args.guard else None
        report = make_report(args.base, run_command, args.predictions, args.plots_out, settings, guard,
                             args.figures)
        if args.out:
            args.out.write_text(report.text)
        else:
            sys.stdout.write(report.text)
        if report.guard_failures:
            print("guard failed: " + "; ".join(report.guard_failures), file=sys.stderr)
            sys.exit(GUARD_FAILED)

    cli.run(go)


if __name__ == "__main__":
    main()
