"""Stage `train_classical`: kNN, RBF SVM, random forest and soft voting on image features."""

import argparse
from pathlib import Path

from medpipe import cli, config
from medpipe.classical.features import UnknownFeatureError
from medpipe.classical.models import UnknownModelError
from medpipe.classical.stage import train_classical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE))
    parser.add_argument("--train", type=Path, default=Path("data/processed/train.npz"))
    parser.add_argument("--train-augmented", type=Path, default=Path("data/processed/train_augmented.npz"))
    parser.add_argument("--val", type=Path, default=Path("data/processed/val.npz"))
    parser.add_argument("--out", type=Path, default=Path("models/train_classical"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/train_classical.json"))
    parser.add_argument("--no-mlflow", action="store_true", help="skip MLflow logging (quick local trials)")
    args = parser.parse_args()
    train_classical(config.load_params(args.params), args.train, args.val, args.out, args.metrics,
                    train_augmented=args.train_augmented, mlflow_log=not args.no_mlflow)


if __name__ == "__main__":
    cli.register_user_error(UnknownFeatureError, UnknownModelError)
    cli.run(main)
