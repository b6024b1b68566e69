"""Stage `augment` (augment/balance): augmented copies balance the classes of the training split only."""

import argparse
from pathlib import Path

from medpipe import cli, config, data_stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE))
    parser.add_argument("--train", type=Path, default=Path("data/processed/train.npz"))
    parser.add_argument("--out", type=Path, default=Path("data/processed/train_augmented.npz"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/augment.json"))
    args = parser.parse_args()
    data_stages.augment(config.load_params(args.params), args.train, args.out, args.metrics)


if __name__ == "__main__":
    cli.run(main)
