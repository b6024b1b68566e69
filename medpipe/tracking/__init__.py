"""Every MLflow call of the pipeline: runs (:mod:`.runs`), per-epoch curves (:mod:`.curves`), logged and
registered models and the champion alias (:mod:`.models`). Nothing else in medpipe imports mlflow.

The store is ``sqlite:///<repo root>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set (a team's
``mlflow server``); runs are named after the DVC experiment (``DVC_EXP_NAME``) and tagged with the
stage, dataset, model, seed and git commit.

Import what you use from its module: a stage that only starts runs does not load the curves or the models.
"""
