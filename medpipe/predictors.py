"""Every trained model the pipeline selected, found by its file and loaded behind one interface.

Where the training stages put them (paths in ``dvc.yaml``):
- ``models/<model>/seed<k>/model.pt``: a deep classifier (:class:`TorchClassifier`) or a U-Net
  (:class:`UNetSegmenter`), one per training seed, with ``validation.json`` beside it;
- ``models/classical/<model>.joblib``: the classical classifiers, with ``validation.json`` in the folder;
- ``models/pixel_classifier/model.joblib``: the classical segmenter, with ``validation.json``;
- ``reports/evaluate/ensemble.json``: the ``evaluate`` stage's soft vote, its member files and weights
  (:class:`SoftVoteClassifier`).

Each kind of file has one loader, a module with ``load(path)`` (:func:`loader`): importing them here makes
whatever loads models (the ``evaluate`` stage) depend on the code that runs when a model is unpickled or rebuilt.

Classifiers give ``predict_proba(images uint8 (N, H, W, 3)) -> (N, C)`` and ``class_names``;
segmenters ``predict_proba -> (N, H, W)`` and ``predict_masks(images, cleanup)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from scipy.special import log_softmax

from medpipe.classical import predictor as classical_predictor
from medpipe.errors import UserError
from medpipe.io import read_json
from medpipe.segmentation import pixel_classifier as pixel_classifier_model
from medpipe.segmentation import predictor as unet_predictor
from medpipe.segmentation.postprocess import to_masks
from medpipe.training import predictor as classifier_predictor
from medpipe.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)
VALIDATION_FILE = "validation.json"
PIXEL_CLASSIFIER = "pixel_classifier"


class ModelLoadError(UserError, ValueError):
    """A model file could not be found or loaded."""


@dataclass(frozen=True)
class ModelFile:
    name: str            # the model's name in params.yaml (`models` key, classical model, pixel_classifier)
    seed: int | None     # the training seed (None for the classical models, which train once with `seed`)
    path: Path           # the model file (with cross-validation: fold 0's)
    task: str            # classification | segmentation
    folds: tuple[Path, ...] = ()   # with cross-validation: the model file of each fold, in fold order

    @property
    def is_deep(self) -> bool:
        return self.path.suffix == ".pt"

    def validation(self) -> dict[str, Any]:
        """The validation metrics its training stage wrote ({} when there are none)."""
        file = self.path.parent / VALIDATION_FILE
        record = read_json(file) if file.is_file() else {}
        if self.is_deep or self.task == "segmentation":
            return record.get("validation") or {}
        return record.get(self.name) or {}

    def load(self) -> Any:
        """The model, loaded by the module of its kind (:func:`loader`); with folds, their :class:`FoldAverage`."""
        if self.folds:
            return FoldAverage(tuple(load_any(path, self.task) for path in self.folds))
        return load_any(self.path, self.task)


def _why_missing(path: Path) -> str:
    record = path.with_name(VALIDATION_FILE)
    return read_json(record).get("status") if record.is_file() else "not trained (run dvc repro)"


def _deep_paths(models_dir: Path, name: str, seed: int, folds: list[int]) -> list[Path]:
    """``models/<name>/seed<k>/model.pt``, or with folds each fold's ``models/<name>/seed<k>-fold<f>/model.pt``."""
    folder = Path(models_dir) / name
    return [folder / f"seed{seed}-fold{f}" / "model.pt" for f in folds] or [folder / f"seed{seed}" / "model.pt"]


def deep_models(models_dir: Path, names: list[str], seeds: list[int], task: str,
                folds: list[int] = ()) -> list[ModelFile]:
    """``models/<name>/seed<k>/model.pt`` of every selected deep model and seed; skipped ones are noted.

    With ``folds`` (cross-validation): ``models/<name>/seed<k>-fold<f>/model.pt``, one :class:`ModelFile` per
    model and seed holding every fold's file (left out, with a warning, unless every fold has one).
    """
    found = []
    for name in names:
        for seed in seeds:
            paths = _deep_paths(models_dir, name, seed, folds)
            missing = [p for p in paths if not p.is_file()]
            if missing:   # a recorded skip (a dataset without masks) is news; a model never trained is a warning
                where = f" ({missing[0].parent.name})" if folds else ""
                recorded = missing[0].with_name(VALIDATION_FILE).is_file()
                log.log(logging.INFO if recorded else logging.WARNING, "%s seed %d: no model%s (%s)", name, seed,
                        where, _why_missing(missing[0]))
            else:
                found.append(ModelFile(name, seed, paths[0], task, tuple(paths) if folds else ()))
    return found


def not_trained(models_dir: Path, names: list[str], seeds: list[int], folds: list[int] = ()) -> dict[str, str]:
    """{model: why it has no model file} for each selected deep model (``<model> seed <k>`` when other seeds have
    one) and the pixel classifier; the reason is the one the training stage recorded (a segmenter on a dataset
    without masks), else that it was not trained (the first missing fold's, with cross-validation)."""
    reasons = {}
    for name in names:
        missing = {seed: m[0] for seed in seeds if (m := [p for p in _deep_paths(models_dir, name, seed, folds)
                                                          if not p.is_file()])}
        for seed, path in missing.items():
            reasons[name if len(missing) == len(seeds) else f"{name} seed {seed}"] = _why_missing(path)
    pixel = Path(models_dir) / PIXEL_CLASSIFIER / "model.joblib"
    if pixel.parent.is_dir() and not pixel.is_file():
        reasons[PIXEL_CLASSIFIER] = _why_missing(pixel)
    return reasons


def classical_models(models_dir: Path, folds: list[int] = ()) -> list[ModelFile]:
    """``models/classical/<model>.joblib``; with ``folds``, each model's files in ``models/classical-fold<f>/``."""
    if not folds:
        folder = Path(models_dir) / "classical"
        return [ModelFile(p.stem, None, p, "classification") for p in sorted(folder.glob("*.joblib"))]
    folders = [Path(models_dir) / f"classical-fold{f}" for f in folds]
    names = sorted(set.intersection(*({p.stem for p in folder.glob("*.joblib")} for folder in folders)))
    return [ModelFile(name, None, folders[0] / f"{name}.joblib", "classification",
                      tuple(folder / f"{name}.joblib" for folder in folders)) for name in names]


def pixel_classifier(models_dir: Path) -> list[ModelFile]:
    path = Path(models_dir) / PIXEL_CLASSIFIER / "model.joblib"
    return [ModelFile(PIXEL_CLASSIFIER, None, path, "segmentation")] if path.is_file() else []


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities ``softmax(log p / T)``: T > 1 softens over-confident predictions, T < 1 sharpens.

    Temperature scaling (``medpipe.evaluation.calibration`` fits T); it lives here because the served
    ensemble applies its temperature too.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if temperature == 1.0:
        return np.asarray(proba, dtype=np.float64)
    return np.exp(log_softmax(log_proba(proba) / temperature, axis=1))


def log_proba(proba: np.ndarray) -> np.ndarray:
    """``log p`` with zeros clipped to the smallest float64 step (a probability of 0 has no logarithm)."""
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), np.finfo(np.float64).eps, 1.0))


@dataclass(frozen=True)
class SoftVoteClassifier:
    """The weighted mean of its members' probabilities under one temperature (the ``evaluate`` stage's ensemble)."""

    members: tuple[tuple[Any, float], ...]   # (classifier, weight > 0)
    temperature: float = 1.0

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.members[0][0].class_names)

    def predict_proba(self, images):
        total = sum(w for _, w in self.members)
        return apply_temperature(sum(w / total * model.predict_proba(images) for model, w in self.members),
                                 self.temperature)

    @classmethod
    def load(cls, path: Path, root: Path | None = None) -> SoftVoteClassifier:
        """From ``{"members": [{"file": ..., "weight": ...}, ...], "temperature": ...}`` (the ensemble's record, or a
        fold average's); member paths relative to ``root`` (default: the working folder); a file without a
        temperature serves the plain weighted mean."""
        record = read_json(path)
        members = [(m["file"], float(m["weight"])) for m in record.get("members", []) if m["weight"] > 0]
        if not members:
            raise ModelLoadError(f"{path}: an ensemble file with no member of positive weight")
        temperature = record.get("temperature", 1.0)
        if not (isinstance(temperature, int | float) and temperature > 0):
            raise ModelLoadError(f"{path}: temperature {temperature!r} is not a positive number")
        loaded = tuple((load_model(file, root), weight) for file, weight in members)
        names = {tuple(model.class_names) for model, _ in loaded}
        if len(names) > 1:
            raise ModelLoadError(f"{path}: the members predict different classes {sorted(names)}")
        return cls(loaded, float(temperature))


@dataclass(frozen=True)
class FoldAverage:
    """The models of the k cross-validation folds of one model (and seed), as one: the mean of their
    probabilities (class probabilities of a classifier, a segmenter's per-pixel lesion probabilities).

    ``members[f]`` never saw fold ``f``'s images: the ``evaluate`` stage predicts those with it alone
    (out-of-fold) and the test split with the average.
    """

    members: tuple[Any, ...]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.members[0].class_names)

    @property
    def threshold(self) -> float:
        return float(self.members[0].threshold)

    @property
    def postprocess(self) -> bool:
        return bool(self.members[0].postprocess)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return sum(np.asarray(m.predict_proba(images), dtype=np.float64) for m in self.members) / len(self.members)

    def predict_masks(self, images: np.ndarray, cleanup) -> np.ndarray:
        """Masks of the averaged lesion probabilities, thresholded and cleaned up as the members' own."""
        return to_masks(self.predict_proba(images), self.threshold, self.postprocess, cleanup)


def loader(path: Path, task: str | None = None) -> ModuleType:
    """The module whose ``load(path)`` rebuilds the model in ``path``: a checkpoint by what it holds, a
    ``.joblib`` file by its ``task`` (the classical classifiers' unless ``segmentation``)."""
    if path.suffix == ".pt":
        return unet_predictor if "unet" in load_checkpoint(path).get("extra", {}) else classifier_predictor
    if path.suffix == ".joblib":
        return pixel_classifier_model if task == "segmentation" else classical_predictor
    raise ModelLoadError(f"{path}: unknown model file type {path.suffix!r}; expected .pt, .joblib or .json")


def load_any(path: str | Path, task: str | None = None, root: Path | None = None) -> Any:
    """A classifier or segmenter from its ``.pt`` checkpoint or ``.joblib`` file, or an ensemble's ``.json``;
    ``root``: the folder a relative ``path`` (and a record's member paths) are under, default the working folder."""
    path = Path(root, path) if root is not None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist: run the training stages (dvc repro)")
    if path.suffix == ".json":
        return SoftVoteClassifier.load(path, root)
    model = loader(path, task).load(path)
    if not hasattr(model, "predict_proba"):
        raise ModelLoadError(f"{path}: the loaded object has no 'predict_proba'")
    return model


def load_model(path: str | Path, root: Path | None = None) -> Any:
    """A classifier (``class_names`` and ``predict_proba`` -> (N, C)); a segmenter file is refused."""
    model = load_any(path, root=root)
    if not hasattr(model, "class_names"):
        raise ModelLoadError(f"{path} is not a classifier (it has no class names): pass a classifier's model file")
    return model


BUNDLE_RECORD = "model.json"   # a bundled record's file in its folder (medpipe.promote.bundle_record)


def load(path: Path) -> SoftVoteClassifier:
    """The loader MLflow calls for a record logged as a bundle: the folder holding ``model.json`` and every file it
    names, under paths relative to the folder (``medpipe.promote.bundle_record``)."""
    return SoftVoteClassifier.load(Path(path) / BUNDLE_RECORD, root=Path(path))
