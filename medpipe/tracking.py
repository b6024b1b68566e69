"""MLflow tracking: one store per repository, runs named after the DVC experiment.

The store is ``sqlite:///<repo root>/mlflow.db`` (artifacts in ``<repo root>/mlartifacts``) unless
``MLFLOW_TRACKING_URI`` is set. The repository root comes from ``DVC_ROOT``, which DVC sets in every
stage, so queued and ``--temp`` experiments, which run in a copy under ``.dvc/tmp/exps``, log to the
same store as the workspace.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from medpipe.paths import repo_root

EXPERIMENT = "medpipe"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def artifact_location() -> str:
    return (repo_root() / "mlartifacts").as_uri()


def registered_model_name(dataset: str, model: str) -> str:
    return f"medpipe-{dataset}-{model}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as MLflow's flat ``section.key`` parameters."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _experiment_id(mlflow: Any) -> str:
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location())
    except Exception:  # created concurrently by another stage
        return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id


@contextlib.contextmanager
def start_run(stage: str, dataset: str, model: str, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """An MLflow run for one model of one stage, tagged with the stage, dataset, model and DVC experiment."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = _experiment_id(mlflow)
    exp_name = os.environ.get("DVC_EXP_NAME")
    run_name = f"{exp_name or 'workspace'}/{stage}/{model}"
    tags = {"stage": stage, "dataset": dataset, "model": model, "dvc_experiment": exp_name or "workspace"}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        if params:
            flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
            mlflow.log_params(flat)
        yield run


def pinned_requirements(*packages: str) -> list[str]:
    """``name==installed version`` for each package a logged model imports (faster and surer than
    MLflow's own inference, which loads the model in a subprocess); unknown packages stay unpinned."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in packages:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def registration_record(info: Any, registered_name: str) -> dict[str, Any]:
    """The sidecar written beside a model file: which MLflow run and registered version hold it."""
    version = info.registered_model_version
    return {
        "run_id": info.run_id,
        "registered_model": registered_name,
        "version": int(version) if version is not None else None,
        "model_uri": f"models:/{registered_name}/{version}",
    }
