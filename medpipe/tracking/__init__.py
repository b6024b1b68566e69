"""Every MLflow call of the pipeline: runs (:mod:`.runs`), per-epoch curves (:mod:`.curves`), logged and
registered models and the champion alias (:mod:`.models`). Nothing else in medpipe imports mlflow.

The store is ``sqlite:///<repo root>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set (a team's
``mlflow server``); runs are named after the DVC experiment (``DVC_EXP_NAME``) and tagged with the
stage, dataset, model, seed and git commit.
"""

from medpipe.tracking.curves import EpochLog
from medpipe.tracking.runs import flatten, registered_model_name, start_run, tracking_uri

__all__ = ["EpochLog", "flatten", "registered_model_name", "start_run", "tracking_uri", "log_trained_model",
           "set_champion", "find_model_version"]


def __getattr__(name: str):
    """The model-logging functions import mlflow and torch: load them on first use only."""
    if name in ("log_trained_model", "set_champion", "find_model_version"):
        from medpipe.tracking import models

        return getattr(models, name)
    raise AttributeError(name)
