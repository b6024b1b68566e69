"""``medpipe-promote``: give the champion that ``evaluate`` chose the MLflow ``champion`` alias.

Promotion is an explicit act, never a side effect of a run: ``dvc exp run``, queued experiments and pull-request
checks all run ``evaluate``, and none of them may move the alias that serving reads
(``models:/medpipe-<dataset>-<model>@champion``). Run it where a change is accepted: on the main branch after a
merge (by hand or in CI). The previous champion of the dataset loses the alias; the model file's registered
version is found by its MD5, so promoting the same file twice changes nothing.

A champion that is a record of several models (the ensemble, a fold average) has no training run that registered
it: it is registered here, the first time it is promoted, as one pyfunc over its bundled members.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import medpipe
from medpipe import cli, config
from medpipe.data.imageset import ImageSet
from medpipe.io import read_json, write_json
from medpipe.predictors import BUNDLE_RECORD, load_model
from medpipe.tracking.models import TrackingError, file_md5, find_model_version, log_trained_model, promote, \
    slim_checkpoint
from medpipe.tracking.runs import registered_model_name, start_run

log = logging.getLogger(__name__)
DEFAULT_CHAMPION = Path("reports/evaluate/champion.json")
DEFAULT_EXAMPLES = Path("data/processed/val")
LOADER = "medpipe.predictors"   # loads a bundled record (predictors.load)


def record_digest(record_file: Path) -> str:
    """What identifies a record of several models (the ensemble's, a fold average's): the MD5 of its temperature and
    of each member's weight and digest (a file's MD5, a nested record's digest), not of the record's bytes, which
    name where the members lie."""
    record = read_json(record_file)
    members = [[record_digest(Path(m["file"])) if m["file"].endswith(".json") else file_md5(Path(m["file"])),
                float(m["weight"])] for m in record["members"] if m["weight"] > 0]
    canonical = json.dumps({"temperature": record.get("temperature", 1.0), "members": members}, sort_keys=True)
    return hashlib.md5(canonical.encode()).hexdigest()


def bundle_record(record_file: Path, folder: Path) -> Path:
    """``folder`` holding the record (``model.json``) and every model file it names, under ``members/`` (checkpoints
    without their optimiser state; nested records bundled in turn), paths relative to ``folder``: one artifact that
    ``medpipe.predictors.load`` serves anywhere."""
    def copy_members(record: dict[str, Any], prefix: str) -> dict[str, Any]:
        members = []
        for k, member in enumerate(m for m in record["members"] if m["weight"] > 0):
            source, name = Path(member["file"]), f"members/{prefix}{k}-{member.get('model', 'member')}"
            if source.suffix == ".json":
                nested = copy_members(read_json(source), f"{prefix}{k}-")
                write_json(folder / f"{name}.json", nested)
                target = Path(f"{name}.json")
            else:
                (folder / name).mkdir(parents=True)
                copied = slim_checkpoint(source, folder / name) if source.suffix == ".pt" else \
                    Path(shutil.copy2(source, folder / name / source.name))
                target = copied.relative_to(folder)
            members.append({**member, "file": target.as_posix()})
        return {**record, "members": members}

    (folder / "members").mkdir(parents=True)
    write_json(folder / BUNDLE_RECORD, copy_members(read_json(record_file), ""))
    return folder


def register_record(chosen: dict[str, Any], dataset: str, examples: Path, workdir: Path) -> str:
    """Log and register the champion's record (the ensemble, a fold average) as one MLflow model, a pyfunc over its
    members, unless a version of it exists; its digest (:func:`record_digest`)."""
    record_file = Path(chosen["file"])
    digest = record_digest(record_file)
    if find_model_version(digest, registered_model_name(dataset, chosen["model"])) is not None:
        return digest
    if not (examples / "metadata.npz").is_file():
        raise FileNotFoundError(f"{examples} holds no images for the model's input example and signature: run the "
                                "pipeline first (dvc repro, or dvc pull)")
    example = ImageSet.load(examples).images[:2]
    with start_run("promote", dataset, chosen["model"], seed=chosen.get("seed")):
        log_trained_model(record_file, load_model(record_file), example, dataset, chosen["model"],
                          {chosen["selected_by"].replace(" ", "_"): chosen["validation_score"]},
                          loader=LOADER, artifact=bundle_record(record_file, workdir / "bundle"), digest=digest)
    return digest


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
    parser.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES,
                        help="an image set whose first images become the input example of a champion registered on "
                             f"promotion (the ensemble, a fold average; default: {DEFAULT_EXAMPLES})")
    args = parser.parse_args(argv)

    def go() -> None:
        if not args.champion.is_file():
            raise FileNotFoundError(f"{args.champion} does not exist: run the evaluate stage first (dvc repro)")
        chosen = read_json(args.champion)
        if not chosen.get("file"):
            raise TrackingError(f"{args.champion} names no champion (no classifier had a validation score)")
        dataset = config.dataset_name(config.load_params(args.params))
        digest = None
        if chosen["file"].endswith(".json"):   # the ensemble or a fold average: registered when first promoted
            with tempfile.TemporaryDirectory() as tmp:
                digest = register_record(chosen, dataset, args.examples, Path(tmp))
        done = promote(Path(chosen["file"]), dataset, digest)
        demoted = ", ".join(done["demoted"]) or "none"
        print(f"{done['champion_uri']} -> version {done['version']} ({chosen['model']}, {chosen['selected_by']} "
              f"{chosen['validation_score']}); alias taken from: {demoted}", file=sys.stdout)

    cli.run(go)


if __name__ == "__main__":
    main()
