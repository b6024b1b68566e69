"""Find and load every trained classifier by its file, whatever stage wrote it.

- ``models/<stage>/<model>.pt``: a torch model, loaded with
  ``medpipe.training.predictor.TorchClassifier.load`` (deep: TTA and Grad-CAM apply);
- ``models/<stage>/<model>.joblib``: a scikit-learn style model (classical models, voting ensemble).

Both give ``predict_proba(images uint8 (N, H, W, 3)) -> (N, C)`` and ``class_names``. Beside each
file, ``<model>.mlflow.json`` names its MLflow run and registered version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medpipe.io import read_json

log = logging.getLogger(__name__)

TRAINING_STAGES = ("train_cnn", "train_resnet", "train_classical")
SUFFIXES = {".pt": "deep", ".joblib": "classical"}


class ModelLoadError(ValueError):
    """A model file could not be found or loaded."""


@dataclass(frozen=True)
class ModelFile:
    name: str    # unique across stages: the file stem, prefixed by the stage only on a clash
    stage: str
    path: Path

    @property
    def kind(self) -> str:
        return SUFFIXES[self.path.suffix]

    @property
    def is_deep(self) -> bool:
        return self.kind == "deep"

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".mlflow.json")

    def mlflow_info(self) -> dict[str, Any] | None:
        return read_json(self.sidecar) if self.sidecar.is_file() else None


def discover(models_dir: Path, stages: tuple[str, ...] = TRAINING_STAGES) -> list[ModelFile]:
    """Every model file under ``models_dir/<stage>/``; a stage without models is noted and skipped."""
    found: list[tuple[str, Path]] = []
    for stage in stages:
        folder = Path(models_dir) / stage
        files = sorted(p for p in folder.glob("*") if p.suffix in SUFFIXES and p.is_file()) if folder.is_dir() else []
        if not files:
            log.warning("no model in %s (stage %s not run yet?): skipped", folder, stage)
        found.extend((stage, p) for p in files)
    stems = [p.stem for _, p in found]
    return [
        ModelFile(name=p.stem if stems.count(p.stem) == 1 else f"{stage}_{p.stem}", stage=stage, path=p)
        for stage, p in found
    ]


def load_model(path: str | Path) -> Any:
    """Load a classifier from its ``.pt`` or ``.joblib`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist: run the training stage (dvc repro)")
    if path.suffix == ".pt":
        from medpipe.training.predictor import TorchClassifier

        return TorchClassifier.load(path)
    if path.suffix == ".joblib":
        import joblib

        model = joblib.load(path)
        for attribute in ("predict_proba", "class_names"):
            if not hasattr(model, attribute):
                raise ModelLoadError(f"{path}: the loaded object has no {attribute!r}")
        return model
    raise ModelLoadError(f"{path}: unknown model file type {path.suffix!r}; expected one of {sorted(SUFFIXES)}")
