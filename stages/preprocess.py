"""Stage `preprocess` (crop/normalize): decode, crop and resize every image into one array file."""

import argparse
from pathlib import Path

from medpipe import cli, config, data_stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE))
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--out", type=Path, default=Path("data/interim/images.npz"))
    parser.add_argument("--report", type=Path, default=Path("data/interim/preprocess_report.json"))
    args = parser.parse_args()
    data_stages.preprocess(config.load_params(args.params), args.raw, args.out, args.report)


if __name__ == "__main__":
    cli.run(main)
