"""Stage `split`: stratified, duplicate-grouped 70/15/15 split and training-split normalisation statistics."""

import argparse
from pathlib import Path

from medpipe import cli, config, data_stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE))
    parser.add_argument("--images", type=Path, default=Path("data/interim/images.npz"))
    parser.add_argument("--report", type=Path, default=Path("data/interim/preprocess_report.json"))
    parser.add_argument("--out", type=Path, default=Path("data/processed"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/data.json"))
    args = parser.parse_args()
    data_stages.split(config.load_params(args.params), args.images, args.report, args.out, args.metrics)


if __name__ == "__main__":
    cli.run(main)
