"""Per-epoch metrics of a training run: DVCLive files for ``dvc plots``, and the same numbers in MLflow."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TIMING_KEYS = frozenset({"seconds", "epoch_seconds", "images_per_second"})


class EpochLog:
    """``with EpochLog(dir) as epochs: fit(..., on_epoch=epochs.log)``.

    Writes ``<dir>/plots/metrics/{train,val}/<metric>.tsv`` and ``lr.tsv`` through DVCLive (step =
    epoch, no timestamps, no timings: the files stay byte-identical on a rerun) and logs every value
    to the active MLflow run, if any.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.live: Any = None

    def __enter__(self) -> EpochLog:
        from dvclive import Live

        self.live = Live(dir=str(self.directory), dvcyaml=False, save_dvc_exp=False, report=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.end()

    def record_best(self, epoch: int, validation: dict[str, float | None]) -> None:
        """DVCLive's ``metrics.json`` (a DVC metric: ``dvc exp show``, ``dvc metrics diff``) holds the best epoch and
        its validation metrics, what chose the checkpoint, rather than the last epoch's values."""
        last = self.live.summary.get("step")  # the last epoch logged: DVCLive keeps it as the run's step
        self.live.summary = {"best_epoch": int(epoch),
                             "val": {k: v for k, v in validation.items() if v is not None and math.isfinite(v)},
                             **({"step": last} if last is not None else {})}

    def log(self, record: dict[str, float]) -> None:
        import mlflow

        values = {k: float(v) for k, v in record.items()
                  if k != "epoch" and k not in TIMING_KEYS and v is not None and math.isfinite(float(v))}
        self.live.step = int(record["epoch"])
        for key, value in values.items():
            split, _, metric = key.partition("_")
            name = f"{split}/{metric}" if split in ("train", "val") and metric else key
            self.live.log_metric(name, round(value, 6))
        self.live.next_step()
        if mlflow.active_run() is not None:
            mlflow.log_metrics(values, step=int(record["epoch"]))
