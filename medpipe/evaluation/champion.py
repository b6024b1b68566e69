"""Choose the champion by a named *validation* metric and give its MLflow version the alias ``champion``.

The choice uses validation metrics only (``metrics/<stage>.json``), never the test split, so the
test scores stay an unbiased estimate for the chosen model too.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from medpipe.io import read_json
from medpipe.predictors import ModelFile

log = logging.getLogger(__name__)
ALIAS = "champion"


def validation_scores(models: list[ModelFile], metrics_dir: Path, metric: str) -> dict[str, float]:
    """``{model name: validation metric}`` from ``metrics_dir/<stage>.json``; models without it are left out."""
    cache: dict[str, dict] = {}
    scores = {}
    for m in models:
        path = Path(metrics_dir) / f"{m.stage}.json"
        if m.stage not in cache:
            cache[m.stage] = read_json(path) if path.is_file() else {}
        entry = cache[m.stage].get(m.path.stem)
        value = entry.get(metric) if isinstance(entry, dict) else None
        if isinstance(value, int | float) and not math.isnan(value):
            scores[m.name] = float(value)
        else:
            log.warning("no validation %s for %s in %s: it cannot become champion", metric, m.name, path)
    return scores


def choose(scores: dict[str, float]) -> str | None:
    """The best model (highest score; ties go to the first name in sorted order), None if there is none."""
    if not scores:
        return None
    return min(sorted(scores), key=lambda name: -scores[name])


def set_alias(info: dict[str, Any]) -> bool:
    """Point the ``champion`` alias of ``info['registered_model']`` at ``info['version']``."""
    import mlflow
    from mlflow import MlflowClient

    from medpipe.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    MlflowClient().set_registered_model_alias(info["registered_model"], ALIAS, str(info["version"]))
    return True


def crown(model: ModelFile, metric: str, score: float) -> dict[str, Any]:
    """The champion record (written to ``champion.json``); sets the MLflow alias when the model is registered."""
    record: dict[str, Any] = {
        "model": model.name, "stage": model.stage, "path": str(model.path),
        "selected_by": f"validation {metric}", "validation_score": score, "alias_set": False,
    }
    info = model.mlflow_info()
    if not info or not info.get("registered_model") or info.get("version") in (None, ""):
        log.warning("%s has no MLflow sidecar %s: the champion alias was not set", model.name, model.sidecar)
        return record
    record.update({k: info.get(k) for k in ("run_id", "registered_model", "version", "model_uri")})
    try:
        record["alias_set"] = set_alias(info)
        record["champion_uri"] = f"models:/{info['registered_model']}@{ALIAS}"
    except Exception as err:  # the registry is a convenience: evaluation results stand without it
        log.warning("could not set the MLflow alias %r on %s v%s: %s", ALIAS, info["registered_model"],
                    info["version"], err)
    return record
