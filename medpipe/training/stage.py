"""The ``train`` stage: one deep classifier of ``classifiers`` (an entry of ``models``), trained with one seed.

The output folder, the MLflow run and data-parallel training are :mod:`medpipe.training.runner`'s; this
module validates the classifier's entry and trains it (:func:`medpipe.training.classify.train_classifier`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medpipe import config
from medpipe.training import runner
from medpipe.training.classify import train_classifier
from medpipe.training.config import ClassifierSpec, TrainConfig
from medpipe.training.loop import FitResult
from medpipe.training.predictor import TorchClassifier
from medpipe.training.runner import DeepStage, Splits, TrainPaths

__all__ = ["TrainPaths", "model_spec", "run"]


def model_spec(params: dict, name: str) -> ClassifierSpec:
    """``models.<name>`` validated as a classifier (a segmenter's entry is refused: it trains in ``train_segmenter``)."""
    if ((params.get("models") or {}).get(name) or {}).get("arch") == "unet":
        raise config.ParamsError(f"params.yaml: models.{name} is a segmenter (arch: unet): list it in `segmenters`, "
                                 "not in `classifiers`")
    spec = runner.model_spec(params, name, ClassifierSpec)
    if spec.weights not in ("imagenet", "none") and not Path(spec.weights).is_file():
        raise config.ParamsError(f"params.yaml: models.{name}.weights: {spec.weights!r} is neither 'imagenet', "
                                 "'none' nor an existing state-dict file")
    return spec


def fit_classifier(name: str, spec: ClassifierSpec, cfg: TrainConfig, splits: Splits, seed: int,
                   checkpoint: Path | None, on_epoch) -> tuple[TorchClassifier, FitResult]:
    train, val, norm = splits
    return train_classifier(name, spec, cfg, train, val, norm, checkpoint, seed, on_epoch=on_epoch)


STAGE = DeepStage("stages.train", "medpipe.training.predictor", fit_classifier)


def run(params: dict, paths: TrainPaths) -> dict[str, Any]:
    """Train classifier ``paths.model`` with ``paths.seed``; write ``model.pt`` and ``validation.json``."""
    spec = model_spec(params, paths.model)
    cfg = spec.train_config(config.load_section(params, "train", TrainConfig))
    return runner.run(STAGE, params, spec, cfg, paths)
