"""``medpipe-predict``: class probabilities for image files from the champion (or a named model).

Images go through exactly the preprocessing of the ``preprocess`` stage (``imaging.decode_image``,
then ``preprocess.process_image``: the dataset's crop and resize to ``image_size``), with the
settings read from ``params.yaml``, so a file scores as its copy in the test split does.

    medpipe-predict scans/                       # every image under a folder, champion model
    medpipe-predict a.png b.jpg --model svm      # a model by name (see metrics/evaluate.json; `ensemble` too) ...
    medpipe-predict a.png --model models/resnet18/seed42/model.pt    # ... or by file
    medpipe-predict a.png --model-uri models:/medpipe-busi-svm@champion   # an MLflow model
    medpipe-predict a.png --request > body.json  # the JSON body for `mlflow models serve`
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import medpipe
from medpipe import cli, config
from medpipe.config import training_seeds
from medpipe.data import imaging
from medpipe.data.preprocess import process_image
from medpipe.data.registry import DatasetSpec, get_spec
from medpipe.errors import UserError
from medpipe.evaluation import ensemble
from medpipe.io import read_json
from medpipe.predictors import classical_models, deep_models, load_model

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
DEFAULT_CHAMPION = Path("reports/evaluate/champion.json")


class PredictError(UserError, ValueError):
    """Bad input to medpipe-predict."""


@dataclass(frozen=True)
class Preprocessing:
    crop: str
    size: int
    mask_suffix: str | None = None

    @classmethod
    def from_params(cls, params: dict, spec: DatasetSpec | None = None) -> Preprocessing:
        """The crop and size the ``preprocess`` stage uses for the dataset named in ``params``."""
        spec = spec or get_spec(config.dataset_name(params))
        cfg = config.load_section(params, "preprocess", config.PreprocessConfig)
        crop = spec.crop if cfg.crop == "auto" else cfg.crop
        return cls(crop=crop, size=config.image_size(params, spec.image_size), mask_suffix=spec.mask_suffix)

    def is_mask(self, path: Path) -> bool:
        return bool(self.mask_suffix) and re.search(rf"{re.escape(self.mask_suffix)}(?:_\d+)?$", path.stem) is not None

    def load(self, path: Path) -> np.ndarray:
        """Decode, crop and resize one file into a uint8 (size, size, 3) image."""
        try:
            image = imaging.decode_image(path.read_bytes())
        except imaging.ImageDecodeError as err:
            raise imaging.ImageDecodeError(f"{path}: {err}") from None
        return process_image(image, None, self.crop, self.size).image


def collect_files(paths: Iterable[Path], prep: Preprocessing) -> list[Path]:
    """Image files named or found (recursively, sorted) under folders; hidden files and masks skipped."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            masks = [p for p in found if prep.is_mask(p)]
            if masks:
                log.info("%s: skipped %d mask files", path, len(masks))
            files.extend(p for p in found if p not in set(masks))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    if not files:
        raise PredictError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {[str(p) for p in paths]}")
    return files


def resolve_model(model: str | None, models_dir: Path, champion_file: Path, params: dict) -> Path:
    """A model file from a path, a model name (its best seed by validation), or the champion record.

    ``ensemble`` is the evaluate stage's soft vote: its file lists the member files and weights.
    """
    if model is None:
        if not champion_file.is_file():
            raise FileNotFoundError(f"{champion_file} does not exist: run `dvc repro evaluate` or pass --model")
        record = read_json(champion_file)
        if not record.get("file"):
            raise PredictError(f"{champion_file} names no champion (no model had validation metrics): pass --model")
        return Path(record["file"])
    if Path(model).suffix in (".pt", ".joblib", ".json"):
        return Path(model)
    if model == ensemble.NAME:   # the evaluate stage writes it beside champion.json
        return champion_file.with_name(ensemble.FILE)
    known = deep_models(models_dir, [model], training_seeds(params), "classification") \
        + [m for m in classical_models(models_dir) if m.name == model]
    if not known:
        raise PredictError(f"no trained model {model!r} under {models_dir} (a name of `classifiers` or "
                           f"`classical.models` in params.yaml, or a .pt/.joblib file)")
    return max(known, key=lambda m: m.validation().get("balanced_accuracy") or 0.0).path


FILES_AT_ONCE = 256   # images decoded and predicted together: memory stays flat however many files are given


def predict_files(model: Any, files: Sequence[Path], prep: Preprocessing) -> np.ndarray:
    """(N, C) class probabilities of the files, decoded and predicted ``FILES_AT_ONCE`` at a time."""
    return np.concatenate([
        np.asarray(model.predict_proba(np.stack([prep.load(p) for p in files[start:start + FILES_AT_ONCE]])),
                   dtype=np.float64)
        for start in range(0, len(files), FILES_AT_ONCE)])


def write_table(files: Sequence[Path], proba: np.ndarray, class_names: Sequence[str], fmt: str, out) -> None:
    if fmt == "json":
        rows = [{"file": str(f), "predicted": class_names[int(p.argmax())],
                 "probabilities": {c: float(v) for c, v in zip(class_names, p, strict=True)}}
                for f, p in zip(files, proba, strict=True)]
        json.dump(rows, out, indent=2)
        out.write("\n")
        return
    writer = csv.writer(out, delimiter="\t" if fmt == "tsv" else ",")
    writer.writerow(["file", "predicted", *class_names])
    for f, p in zip(files, proba, strict=True):
        writer.writerow([str(f), class_names[int(p.argmax())], *(f"{v:.6f}" for v in p)])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="medpipe-predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Class probabilities for image files, from the champion model or a named one. Each image is "
                    "decoded, cropped\nand resized exactly as the preprocess stage does it (settings from the params "
                    "file), so a file scores\nas its copy in the test split does.",
        epilog="examples:\n"
               "  medpipe-predict scans/                            every image under a folder, champion model\n"
               "  medpipe-predict a.png b.jpg --model svm           a model by name (ensemble too)\n"
               "  medpipe-predict a.png --model models/resnet18/seed42/model.pt   a model by file\n"
               "  medpipe-predict a.png --model-uri models:/medpipe-busi-svm@champion   an MLflow model\n"
               "  medpipe-predict a.png --request > body.json       the request body for `mlflow models serve`")
    parser.add_argument("--version", action="version", version=f"%(prog)s {medpipe.__version__}")
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="model name (as in metrics/evaluate.json) or a .pt/.joblib/.json file")
    source.add_argument("--model-uri", help="an MLflow model URI, e.g. models:/medpipe-busi-svm@champion")
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE),
                        help="the params file whose dataset, crop and image size apply (default: params.yaml)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"),
                        help="where the training stages put the models (default: models)")
    parser.add_argument("--champion", type=Path, default=DEFAULT_CHAMPION,
                        help=f"the evaluate stage's record of the champion (default: {DEFAULT_CHAMPION})")
    parser.add_argument("--format", choices=("tsv", "csv", "json"), default="tsv",
                        help="output format, one row per image (default: tsv)")
    parser.add_argument("--request", action="store_true",
                        help="print the JSON request body for `mlflow models serve` instead of predicting")
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None, out=None) -> np.ndarray | None:
    args = parse_args(argv)
    out = out or sys.stdout
    params = config.load_params(args.params)
    spec = get_spec(config.dataset_name(params))
    prep = Preprocessing.from_params(params, spec)
    files = collect_files(args.paths, prep)
    if args.request:
        images = np.stack([prep.load(p) for p in files])
        json.dump({"inputs": images.tolist()}, out, separators=(",", ":"))
        out.write("\n")
        return None
    if args.model_uri:
        from medpipe.tracking.models import load_logged_model   # MLflow and torch only for an MLflow model

        pyfunc = load_logged_model(args.model_uri)
        proba = np.asarray(pyfunc.predict(np.stack([prep.load(p) for p in files])), dtype=np.float64)
        class_names = tuple(spec.class_names)
    else:
        model = load_model(resolve_model(args.model, args.models_dir, args.champion, params))
        proba = predict_files(model, files, prep)
        class_names = tuple(model.class_names)
    write_table(files, proba, class_names, args.format, out)
    return proba


def main() -> None:
    cli.run(lambda: run())


if __name__ == "__main__":
    main()
