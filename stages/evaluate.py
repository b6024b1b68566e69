"""Stage `evaluate`: score every trained model on the test split (metrics with CIs, plots, Grad-CAM, champion)."""

import argparse
from pathlib import Path

from medpipe import cli, config
from medpipe.evaluation.pipeline import ClassMismatchError, NoModelError, Outputs, evaluate
from medpipe.predictors import ModelLoadError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE))
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--metrics-dir", type=Path, default=Path("metrics"), help="validation metrics of training")
    parser.add_argument("--test", type=Path, default=Path("data/processed/test.npz"))
    parser.add_argument("--val", type=Path, default=Path("data/processed/val.npz"))
    parser.add_argument("--out", type=Path, default=Path("metrics/evaluate.json"))
    parser.add_argument("--summary", type=Path, default=Path("metrics/summary.md"))
    parser.add_argument("--plots", type=Path, default=Path("plots/evaluate"))
    parser.add_argument("--champion", type=Path, default=Path("models/evaluate/champion.json"))
    args = parser.parse_args()
    outputs = Outputs(metrics=args.out, summary=args.summary, plots=args.plots, champion=args.champion)
    evaluate(config.load_params(args.params), args.models, args.metrics_dir, args.test, args.val, outputs)


if __name__ == "__main__":
    cli.register_user_error(NoModelError, ClassMismatchError, ModelLoadError)
    cli.run(main)
