"""Training curves of every selected deep model side by side, for DVC's top-level plots.

Each training stage writes its per-epoch curves with DVCLive (``plots/train/<model>/seed<k>/plots/metrics/``:
``train/loss.tsv``, ``val/<metric>.tsv``, one file per metric). DVC draws those one file at a time; a reviewer
wants the models in one chart. ``evaluate`` gathers them into two long tables (one row per model, seed, epoch),
drawn by the templates in ``.dvc/plots/`` with a colour per model:

- ``loss.csv``: ``model, seed, step, split, loss`` (split: train or validation): is a model over-fitting?
- ``validation.csv``: ``model, seed, step, metric, value``: the validation score each model's checkpoint
  choice watched (``train.monitor``: balanced accuracy for classifiers, Dice for the U-Net), epoch by epoch.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

from medpipe.io import atomic_path

SPLITS = {"train": "train", "val": "validation"}


def read_tsv(path: Path) -> list[tuple[int, float]]:
    """``(step, value)`` rows of one DVCLive metric file (``step<TAB><metric>``)."""
    rows = list(csv.reader(path.read_text().splitlines(), delimiter="\t"))
    return [(int(step), float(value)) for step, value in rows[1:]]


def curve_rows(live_dirs: Iterable[tuple[str, int, Path]], monitors: dict[str, str]) -> tuple[list, list]:
    """The loss rows and the validation rows of every ``(model, seed, DVCLive folder)`` that has curves."""
    loss, validation = [], []
    for model, seed, live in live_dirs:
        metrics = live / "plots" / "metrics"
        for folder, split in SPLITS.items():
            file = metrics / folder / "loss.tsv"
            if file.is_file():
                loss += [(model, seed, step, split, value) for step, value in read_tsv(file)]
        metric = monitors.get(model)
        file = metrics / "val" / f"{metric}.tsv"
        if metric and file.is_file():
            validation += [(model, seed, step, metric, value) for step, value in read_tsv(file)]
    return loss, validation


def write_table(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(sorted(rows, key=lambda r: tuple(r[:4])))
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def monitors(params: dict, names: Iterable[str], segmenters: Iterable[str]) -> dict[str, str]:
    """The validation metric each deep model's training watched: ``models.<name>.train.monitor``, else
    ``train.monitor``; the U-Net always watches its Dice."""
    models = params.get("models") or {}
    default = (params.get("train") or {}).get("monitor", "balanced_accuracy")
    watched = {name: ((models.get(name) or {}).get("train") or {}).get("monitor", default) for name in names}
    return watched | {name: "dice" for name in segmenters}


def write_curves(live_dirs: Iterable[tuple[str, int, Path]], monitors: dict[str, str], folder: Path) -> int:
    """``loss.csv`` and ``validation.csv`` under ``folder``; the number of (model, seed) curves found."""
    live_dirs = list(live_dirs)
    loss, validation = curve_rows(live_dirs, monitors)
    write_table(folder / "loss.csv", ("model", "seed", "step", "split", "loss"), loss)
    write_table(folder / "validation.csv", ("model", "seed", "step", "metric", "value"), validation)
    return len({(r[0], r[1]) for r in loss + validation})
