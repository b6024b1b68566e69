"""``medpipe-promote``: give the champion that ``evaluate`` chose the MLflow ``champion`` alias.

Promotion is an explicit act, never a side effect of a run: ``dvc exp run``, queued experiments and pull-request
checks all run ``evaluate``, and none of them may move the alias that serving reads
(``models:/medpipe-<dataset>-<model>@champion``). Run it where a change is accepted: on the main branch after a
merge (by hand or in CI). The previous champion of the dataset loses the alias; the model file's registered
version is found by its MD5, so promoting the same file twice changes nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import medpipe
from medpipe import cli, config
from medpipe.io import read_json
from medpipe.tracking.models import TrackingError, promote

log = logging.getLogger(__name__)
DEFAULT_CHAMPION = Path("reports/evaluate/champion.json")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="medpipe-promote",
        description="Give the model that the evaluate stage chose as champion (best mean validation score) the "
                    "MLflow 'champion' alias; the dataset's previous champion loses it.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {medpipe.__version__}")
    parser.add_argument("--champion", type=Path, default=DEFAULT_CHAMPION,
                        help=f"the evaluate stage's record of its choice (default: {DEFAULT_CHAMPION})")
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE),
                        help="the params file naming the dataset (default: params.yaml)")
    args = parser.parse_args(argv)

    def go() -> None:
        if not args.champion.is_file():
            raise FileNotFoundError(f"{args.champion} does not exist: run the evaluate stage first (dvc repro)")
        chosen = read_json(args.champion)
        if not chosen.get("file"):
            raise TrackingError(f"{args.champion} names no champion (no classifier had a validation score)")
        if chosen["file"].endswith(".json"):
            raise TrackingError(f"the champion is the ensemble ({chosen['file']}): it is no single registered "
                                "model; serve it with medpipe-predict --model ensemble")
        done = promote(Path(chosen["file"]), config.dataset_name(config.load_params(args.params)))
        demoted = ", ".join(done["demoted"]) or "none"
        print(f"{done['champion_uri']} -> version {done['version']} ({chosen['model']}, {chosen['selected_by']} "
              f"{chosen['validation_score']}); alias taken from: {demoted}", file=sys.stdout)

    cli.run(go)


if __name__ == "__main__":
    main()
