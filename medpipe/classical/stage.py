"""The ``train_classical`` stage: fit the classical models, save them, log them to MLflow.

Writes ``<out>/<model>.joblib`` for every model of ``classical.models`` and ``<out>/validation.json``
(``{model: validation metrics}``; no timings, so a rerun on the same inputs gives the same bytes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import joblib

from medpipe import config
from medpipe.classical.config import ClassicalConfig
from medpipe.classical.models import ImageClassifier, TrainResult, train_all
from medpipe.data.imageset import ImageSet
from medpipe.io import atomic_dir, atomic_path, write_json
from medpipe.tracking.models import log_trained_model
from medpipe.tracking.runs import start_run

log = logging.getLogger(__name__)
STAGE = "train_classical"
VALIDATION_FILE = "validation.json"
LOADER = "medpipe.classical.predictor"   # the module that loads the saved models (named in MLflow)


@dataclass(frozen=True)
class ClassicalPaths:
    train: Path    # data/processed/<classical.train_set>
    val: Path      # data/processed/val
    out: Path      # models/classical/ (models/classical-fold<f>/ for a cross-validation fold)
    fold: int | None = None   # the cross-validation fold the data comes from (data/folds/fold<f>/), if any

    def tracked_name(self, model: str) -> str:
        """A model's name in MLflow: ``<model>``, or ``<model>-fold<f>`` for a fold's."""
        return model if self.fold is None else f"{model}-fold{self.fold}"


def save_model(model: ImageClassifier, path: Path) -> None:
    with atomic_path(path) as tmp:
        joblib.dump(model, tmp, compress=3)


def validation_record(result: TrainResult) -> dict:
    """``{model: {accuracy, balanced_accuracy, f1_macro, roc_auc}}`` on the validation split."""
    return {name: dict(m.metrics) for name, m in result.models.items()}


def log_models(result: TrainResult, out: Path, paths: ClassicalPaths, dataset: str, seed: int, cfg: ClassicalConfig,
               example) -> None:
    """One MLflow run per model: validated config, validation metrics, timings, the registered model."""
    final = paths.out
    for name, trained in result.models.items():
        params = {"seed": seed, "classical": cfg.model_dump(), **({"fold": paths.fold} if paths.fold is not None else {})}
        if trained.best_params:
            params["best"] = trained.best_params
        with start_run(STAGE, dataset, paths.tracked_name(name), params):
            timings = {"fit_seconds": trained.fit_seconds, "feature_seconds": result.feature_seconds}
            log_trained_model(out / f"{name}.joblib", trained.model, example, dataset, paths.tracked_name(name),
                              trained.metrics,
                              timings, recorded_as=final / f"{name}.joblib", loader=LOADER)


def run(params: dict, paths: ClassicalPaths) -> TrainResult:
    """Read the splits, fit every model, write the model folder atomically, log to MLflow."""
    cfg = config.load_section(params, "classical", ClassicalConfig)
    seed = config.global_seed(params)
    dataset = config.dataset_name(params)
    config.seed_everything(seed)
    train_set, val_set = ImageSet.load(paths.train), ImageSet.load(paths.val)
    if train_set.class_names != val_set.class_names:
        raise config.ParamsError(f"class names differ: {paths.train} {train_set.class_names}, "
                                 f"{paths.val} {val_set.class_names}")
    log.info("training on %s (%d images, %s), validating on %d images", paths.train, len(train_set),
             train_set.class_counts(), len(val_set))
    result = train_all(cfg, train_set.images, train_set.labels, val_set.images, val_set.labels,
                       train_set.class_names, seed)
    with atomic_dir(paths.out) as out:
        for name, trained in result.models.items():
            save_model(trained.model, out / f"{name}.joblib")
        write_json(out / VALIDATION_FILE, validation_record(result))
        log_models(result, out, paths, dataset, seed, cfg, val_set.images[:1])
    return result
