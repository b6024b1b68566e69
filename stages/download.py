"""Stage `download`: copy (offline mirror) or download the dataset's files into data/raw/, checksum-verified."""

import argparse
from pathlib import Path

from medpipe import cli, config, data_stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE))
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    args = parser.parse_args()
    data_stages.download(config.load_params(args.params), args.out)


if __name__ == "__main__":
    cli.run(main)
