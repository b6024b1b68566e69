"""Stage `segment`: U-Net and pixel-classifier lesion segmentation, scored on val and test (skipped without masks)."""

import argparse
from pathlib import Path

from medpipe import cli, config
from medpipe.segmentation.stage import SegmentPaths, run_segment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE))
    parser.add_argument("--train", type=Path, default=Path("data/processed/train.npz"))
    parser.add_argument("--val", type=Path, default=Path("data/processed/val.npz"))
    parser.add_argument("--test", type=Path, default=Path("data/processed/test.npz"))
    parser.add_argument("--normalization", type=Path, default=Path("data/processed/normalization.json"))
    parser.add_argument("--models", type=Path, default=Path("models/segment"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/segment.json"))
    parser.add_argument("--plots", type=Path, default=Path("plots/segment"))
    args = parser.parse_args()
    paths = SegmentPaths(args.train, args.val, args.test, args.normalization, args.models, args.metrics, args.plots)
    run_segment(config.load_params(args.params), paths)


if __name__ == "__main__":
    cli.run(main)
