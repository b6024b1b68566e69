"""MLflow runs: one store per repository, runs named after the DVC experiment and tagged with the commit.

The store is ``sqlite:///<repo root>/mlflow.db`` (artifacts in ``<repo root>/mlartifacts``) unless
``MLFLOW_TRACKING_URI`` is set. The repository root comes from ``DVC_ROOT``, which DVC sets in every
stage, so queued and ``--temp`` experiments, which run in a copy under ``.dvc/tmp/exps``, log to the
same store as the workspace.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

from medpipe.paths import repo_root

EXPERIMENT = "medpipe"


TRACKING_ENV = "MEDPIPE_TRACKING"


def tracking_enabled() -> bool:
    """False when ``MEDPIPE_TRACKING=off`` (quick local tries and unit tests log nothing to MLflow)."""
    return os.environ.get(TRACKING_ENV, "on").lower() not in ("off", "0", "false", "no")


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


@contextlib.contextmanager
def _store_lock() -> Iterator[None]:
    """One process at a time opens a SQLite store: MLflow creates a new database's tables on first use, and
    two processes doing so at once (``dvc queue start -j 2`` on a fresh clone) fail with ``duplicate column``."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(uri[len("sqlite:///"):] + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _experiment_id(mlflow: Any) -> str:
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    try:
        local = not tracking_uri().startswith(("http://", "https://", "databricks"))  # a server picks its own store
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location() if local else None)
    except Exception:  # created concurrently by another stage
        return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id


def git_commit() -> str | None:
    """The commit the workspace (or the queued experiment's copy) was made from, if this is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_tags(stage: str, dataset: str, model: str, seed: int | None) -> dict[str, str]:
    """Tags that tie a run to its DVC stage, experiment and commit (the DVC hash of its model file comes later)."""
    exp_name = os.environ.get("DVC_EXP_NAME") or "workspace"
    tags = {"stage": stage, "dataset": dataset, "model": model, "dvc_experiment": exp_name}
    if seed is not None:
        tags["seed"] = str(seed)
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


@contextlib.contextmanager
def start_run(stage: str, dataset: str, model: str, params: Mapping[str, Any] | None = None,
              seed: int | None = None) -> Iterator[Any]:
    """An MLflow run for one model of one stage, named ``<experiment>/<stage>/<model>[/seed<k>]``.

    A run whose block raises ends as FAILED with the error in its ``error`` tag, so a failed
    experiment leaves a trace in the store instead of nothing.
    """
    if not tracking_enabled():
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    with _store_lock():
        experiment_id = _experiment_id(mlflow)
    tags = run_tags(stage, dataset, model, seed)
    run_name = "/".join([tags["dvc_experiment"], stage, model] + ([f"seed{seed}"] if seed is not None else []))
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        try:
            yield run
        except BaseException as err:
            mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
            raise


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
