"""``medpipe-report``: a Markdown pull-request report against a base revision, in the manner of CML.

    medpipe-report                        # workspace vs main, to stdout
    medpipe-report --base HEAD~1 --out report.md --plots-out report_plots

Sections: ``dvc params diff --md``, ``dvc metrics diff --md`` (every model's test metrics and their
confidence bounds), the workspace's model comparison table (``metrics/summary.md``), the plot data
files that changed, the figures of the models concerned and, with ``--plots-out``, the HTML of
``dvc plots diff`` (all plots of both revisions overlaid). Paste the file into the pull request or
post it (``gh pr comment --body-file report.md``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medpipe import cli


class ReportError(RuntimeError):
    """A command the report needs failed (not a git/DVC repository, unknown base revision, ...)."""


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str]], Result]


def run_command(cmd: Sequence[str]) -> Result:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _checked(runner: Runner, cmd: Sequence[str]) -> str:
    result = runner(cmd)
    if result.returncode != 0:
        raise ReportError(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def changed_plot_files(runner: Runner, base: str, plots_dir: str = "plots") -> list[str]:
    """Plot data files tracked by git that differ between ``base`` and the workspace."""
    out = _checked(runner, ["git", "diff", "--name-only", base, "--", plots_dir])
    return sorted(line for line in out.splitlines() if line.strip())


def build_report(base: str, runner: Runner = run_command, summary: Path = Path("metrics/summary.md"),
                 figures: Path = Path("plots/evaluate/figures"), plots_out: Path | None = None) -> str:
    _checked(runner, ["git", "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"])
    head = _checked(runner, ["git", "rev-parse", "--short", "HEAD"]).strip()
    params = _checked(runner, ["dvc", "params", "diff", base, "--md"]).strip()
    metrics = _checked(runner, ["dvc", "metrics", "diff", base, "--md", "--precision", "4"]).strip()
    lines = [
        f"# medpipe report: workspace (HEAD {head}) vs `{base}`",
        "",
        "## Parameters changed",
        "",
        params or "No parameter changed.",
        "",
        "## Metrics changed",
        "",
        "Test-split metrics per model (`evaluate.<model>.<metric>`; `_ci_low`/`_ci_high`: bootstrap interval). "
        "A change smaller than the interval's width is within noise.",
        "",
        metrics or "No metric changed.",
        "",
    ]
    if summary.is_file():
        body = summary.read_text().strip().splitlines()
        body = [f"#{line}" if line.startswith("#") else line for line in body]  # nest under this report
        lines += ["## Model comparison (workspace)", "", *body, ""]
    changed = changed_plot_files(runner, base)
    lines += ["## Plots changed", ""]
    if changed:
        lines += [f"- `{path}`" for path in changed]
        models = sorted({Path(p).stem for p in changed})
        shown = [figures / f"{m}.png" for m in models if (figures / f"{m}.png").is_file()]
        if shown:
            lines += ["", *(f"![{p.stem}]({p.as_posix()})" for p in shown)]
    else:
        lines.append("No plot data changed.")
    if plots_out is not None:
        _checked(runner, ["dvc", "plots", "diff", base, "--out", str(plots_out)])
        lines += ["", f"All plots, `{base}` and workspace overlaid: `{plots_out / 'index.html'}`"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="medpipe-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="main", help="git revision to compare with (default: main)")
    parser.add_argument("--out", type=Path, help="write the Markdown here (default: stdout)")
    parser.add_argument("--summary", type=Path, default=Path("metrics/summary.md"))
    parser.add_argument("--figures", type=Path, default=Path("plots/evaluate/figures"))
    parser.add_argument("--plots-out", type=Path, help="also render `dvc plots diff` HTML into this folder")
    args = parser.parse_args(argv)

    def go() -> None:
        text = build_report(args.base, run_command, args.summary, args.figures, args.plots_out)
        if args.out:
            args.out.write_text(text)
        else:
            sys.stdout.write(text)

    cli.register_user_error(ReportError)
    cli.run(go)


if __name__ == "__main__":
    main()
