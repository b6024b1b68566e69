"""How much cross-validation sharpens a verdict: interval half-widths on the test split and out-of-fold.

Reads an ``evaluate`` run with ``cv.folds`` set (``reports/predictions/`` and its ``out_of_fold/``) and prints, per
model and for each pair with a reference model, the images each comparison rests on and the half-width of the 95%
BCa interval: of the model's metric, and of the paired difference with the reference (the same bootstrap as
``medpipe-report``). Narrower is more power: a lever must move a metric by more than the half-width to be decided.

    python benchmarks/cv_power.py --reference efficientnet_lite0 --metric balanced_accuracy
    python benchmarks/cv_power.py --reference unet --metric dice
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medpipe.evaluation import compare


def half_width(values: dict, metric: str) -> float:
    return (values[f"{metric}_ci_high"] - values[f"{metric}_ci_low"]) / 2


def rows(folder: Path, reference: str, metric: str, resamples: int) -> list[tuple[str, int, float, float, float]]:
    """(model, images, value, half-width of its interval, half-width of its paired difference with ``reference``)."""
    loaded = {p.stem: compare.load_predictions(p) for p in sorted(folder.glob("*.csv"))}
    base = loaded[reference]
    out = []
    for name, predictions in loaded.items():
        if predictions.kind != base.kind:
            continue
        own = compare.intervals(predictions, [metric], resamples=resamples)
        paired = float("nan")
        if name != reference:
            c = compare.compare(base, predictions, [metric], resamples=resamples)[metric]
            paired = (c.ci_high - c.ci_low) / 2
        out.append((name, len(predictions.images), own[metric], half_width(own, metric), paired))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=Path, default=Path("reports/predictions"))
    parser.add_argument("--reference", default="efficientnet_lite0", help="the model every other is paired with")
    parser.add_argument("--metric", default="balanced_accuracy")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    print(f"| model | split | images | {args.metric} | ± (95% BCa) | paired with {args.reference}: ± |")
    print("|---|---|---|---|---|---|")
    for split, folder in (("test", args.predictions), ("out-of-fold", args.predictions / compare.OUT_OF_FOLD_DIR)):
        for name, n, value, own, paired in rows(folder, args.reference, args.metric, args.resamples):
            paired_text = "—" if paired != paired else f"{paired:.3f}"
            print(f"| {name} | {split} | {n} | {value:.3f} | {own:.3f} | {paired_text} |")


if __name__ == "__main__":
    main()
