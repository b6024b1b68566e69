"""The Markdown comparison of all models (``metrics/summary.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medpipe.evaluation.scores import GLOBAL_METRICS, LOWER_IS_BETTER


def fmt(result: dict[str, Any], key: str, digits: int = 3) -> str:
    value = result.get(key)
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    low, high = result.get(f"{key}_ci_low"), result.get(f"{key}_ci_high")
    if low is not None and high is not None:
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown_summary(results: dict[str, dict[str, Any]], class_names: Sequence[str], test_counts: dict[str, int],
                     confidence: float, resamples: int, champion: dict[str, Any] | None) -> str:
    pct = f"{confidence:.0%}"
    lines = [
        "# Test-split evaluation",
        "",
        f"Test images: {sum(test_counts.values())} ("
        + ", ".join(f"{k} {v}" for k, v in test_counts.items()) + "). "
        + (f"Brackets: {pct} percentile-bootstrap interval over test images ({resamples} resamples)."
           if resamples else "No confidence intervals (evaluate.bootstrap_resamples = 0)."),
        "Lower is better for " + ", ".join(sorted(LOWER_IS_BETTER)) + "; higher for the rest. `<model>_tta` rows "
        "average test-time-augmented views. n/a = undefined on this split (e.g. a class absent).",
        "",
    ]
    if champion:
        lines += [f"**Champion** (by {champion['selected_by']} = {champion['validation_score']:.4f}): "
                  f"`{champion['model']}`"
                  + (f", MLflow `{champion['champion_uri']}`" if champion.get("alias_set") else "") + "", ""]
    lines += ["## All metrics", ""]
    lines += _table(["model", *GLOBAL_METRICS], [[f"`{name}`", *(fmt(r, k) for k in GLOBAL_METRICS)]
                                               for name, r in results.items()])
    lines += ["", "## Per class: sensitivity (recall) / specificity / precision / F1", ""]
    header = ["model"] + [f"{c} {m}" for c in class_names for m in ("sens.", "spec.", "prec.", "F1")]
    rows = [[f"`{name}`"] + [fmt(r, f"{m}_{c}", 2) for c in class_names
                             for m in ("recall", "specificity", "precision", "f1")]
            for name, r in results.items()]
    lines += _table(header, rows)
    calibrated = {name: r for name, r in results.items() if r.get("temperature") is not None}
    if calibrated:
        lines += ["", "## Calibration: temperature scaling fitted on the validation split", ""]
        lines += _table(
            ["model", "temperature", "ECE before", "ECE after", "log loss before", "log loss after"],
            [[f"`{name}`", f"{r['temperature']:.3f}", fmt(r, "ece"), fmt(r, "ece_ts"), fmt(r, "log_loss"),
              fmt(r, "log_loss_ts")] for name, r in calibrated.items()],
        )
    return "\n".join(lines) + "\n"
