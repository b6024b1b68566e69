"""The data half of the pipeline as functions: download, preprocess, split, augment.

The scripts in ``stages/`` parse paths and call these; tests call them directly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from medpipe import config
from medpipe.augment import augment_and_balance
from medpipe.download import fetch
from medpipe.imageset import ImageSet
from medpipe.io import atomic_dir, read_json, write_json
from medpipe.preprocess import ArchiveError, read_dataset
from medpipe.registry import get_spec, load_registry, source_files
from medpipe.splitting import SPLITS, normalization_stats, split_dataset

log = logging.getLogger(__name__)
PARTIAL_DIR = Path("data/.partial")  # resumable downloads live outside DVC's outputs


def download(params: dict, out_dir: Path) -> list[Path]:
    spec = get_spec(config.dataset_name(params))
    cfg = config.load_section(params, "download", config.DownloadConfig)
    with atomic_dir(out_dir) as tmp:
        fetched = [fetch(f, tmp, PARTIAL_DIR, cfg.timeout_s).name for f in source_files(spec)]
    return [out_dir / name for name in fetched]


def preprocess(params: dict, raw_dir: Path, out: Path, report: Path) -> ImageSet:
    spec = get_spec(config.dataset_name(params))
    cfg = config.load_section(params, "preprocess", config.PreprocessConfig)
    size = config.image_size(params, spec.image_size)
    start = time.perf_counter()
    result = read_dataset(spec, raw_dir, size, cfg.crop, cfg.workers, load_registry())
    seconds = time.perf_counter() - start
    data = result.imageset
    if len(data) == 0:
        raise ArchiveError(f"no image of dataset {spec.name!r} in {raw_dir} could be read")
    data.save(out)
    write_json(report, {
        "dataset": spec.name,
        "image_size": size,
        "images": len(data),
        "skipped": [{"file": s.member, "reason": s.reason} for s in result.skipped],
    })  # no timings here: the report is a dependency of `split`, and must not change when the data do not
    log.info("%d images at %d px, %d files skipped, %.1f s", len(data), size, len(result.skipped), seconds)
    return data


def split(params: dict, images: Path, report: Path, out_dir: Path, metrics: Path) -> dict[str, ImageSet]:
    cfg = config.load_section(params, "split", config.SplitConfig)
    data = ImageSet.load(images)
    result = split_dataset(data, (cfg.train, cfg.val, cfg.test), cfg.seed, cfg.near_duplicate_distance,
                           cfg.conflicting_labels, cfg.use_source_split)
    parts = {name: data.subset(np.flatnonzero(result.split_of == i)) for i, name in enumerate(SPLITS)}
    for name, part in parts.items():
        if len(part) == 0:
            raise config.ParamsError(
                f"the {name} split is empty: {len(data)} images are too few for split.train/val/test = "
                f"{cfg.train}/{cfg.val}/{cfg.test}"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        part.save(out_dir / f"{name}.npz")
    write_json(out_dir / "normalization.json", normalization_stats(parts["train"].images, cfg.normalization))
    preprocess_report = read_json(report)
    reasons: dict[str, int] = {}
    for skip in preprocess_report["skipped"]:
        reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
    grouping = result.grouping
    write_json(metrics, {
        "dataset": config.dataset_name(params),
        "image_size": data.image_size,
        "images": len(data),
        "classes": list(data.class_names),
        "splits": {name: {"total": len(part), **part.class_counts()} for name, part in parts.items()},
        "duplicates": {
            "exact_copies": grouping.exact_duplicate_copies,
            "near_duplicate_pairs": grouping.near_duplicate_pairs,
            "groups": int(grouping.group_of.max()) + 1,
            "conflicting_label_groups": len(grouping.conflicting_groups),
            "dropped_images": result.dropped,
        },
        "conflicting_label_groups": grouping.conflicting_groups[:50],
        "skipped": {"total": len(preprocess_report["skipped"]), "by_reason": reasons},
    })
    log.info("split %s; %d exact copies, %d near pairs, %d conflicting groups (%d images dropped)",
             {k: len(v) for k, v in parts.items()}, grouping.exact_duplicate_copies, grouping.near_duplicate_pairs,
             len(grouping.conflicting_groups), result.dropped)
    return parts


def augment(params: dict, train: Path, out: Path, metrics: Path) -> ImageSet:
    cfg = config.load_section(params, "augment", config.AugmentConfig)
    data = ImageSet.load(train)
    augmented = augment_and_balance(data, cfg, config.global_seed(params))
    augmented.save(out)
    write_json(metrics, {
        "balance": cfg.balance,
        "train_before": {"total": len(data), **data.class_counts()},
        "train_after": {"total": len(augmented), **augmented.class_counts()},
    })
    return augmented
