"""Stage ``folds``: k-fold cross-validation folds of the non-test images (``cv.folds``), one folder per fold.

The pool is the split stage's training and validation images (the test split is never in it). Its images
are grouped as the split stage groups them (pixel-identical copies, near-duplicates, one lesion's images)
and the groups are dealt into k folds, stratified by label and seeded (``split.seed``), so a duplicate group
never straddles two folds. For fold ``f``:

- ``heldout/``: the fold's own images, predicted by the models trained without them (out-of-fold);
- ``train/`` and ``val/``: the other k-1 folds, cut again by group into training images and an inner
  validation slice (``cv.inner_val``) that chooses the epoch and stops training early, so no out-of-fold
  image ever selects anything for itself;
- ``train_augmented/``: ``train/`` balanced and augmented as the ``augment`` stage does it (only the
  fold's training images are sources);
- ``normalization.json``: the statistics of the fold's training images (``split.normalization``).

Each set is an image-set folder (``medpipe.data.imageset``), streamed from the memory-mapped splits.
``folds.json`` records the counts and the fold of every pool image (the train split's images, then the
validation split's). With ``cv.folds: []`` (hold-out only) the
folder holds ``folds.json`` alone, so the stage costs nothing and changes nothing downstream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medpipe import config
from medpipe.config import AugmentConfig, CVConfig, SplitConfig
from medpipe.data.augment import write_augmented
from medpipe.data.imageset import ImageSet, concatenate, fold_file
from medpipe.data.splitting import assign_groups, group_images, majority_labels, normalization_stats
from medpipe.io import atomic_dir, write_json

log = logging.getLogger(__name__)
FOLDS_RECORD = "folds.json"   # how many folds were written, their sizes (read by evaluate: crossval.FOLDS_RECORD)
FOLD_SETS = ("train", "train_augmented", "val", "heldout")


@dataclass(frozen=True)
class FoldsPaths:
    train: Path    # data/processed/train
    val: Path      # data/processed/val
    out: Path      # data/folds/: fold<f>/ per fold and folds.json


def group_labels(data: ImageSet, group_of: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group ids, each group's majority label, each group's size) of the groups ``group_of`` numbers."""
    groups, labels, _ = majority_labels(group_of, data.labels, data.num_classes)
    return groups, labels, np.bincount(group_of)[groups]


def deal_groups(data: ImageSet, group_of: np.ndarray, fractions: tuple[float, ...], seed) -> np.ndarray:
    """Part index per image: whole groups dealt into ``len(fractions)`` parts, stratified by label."""
    groups, labels, sizes = group_labels(data, group_of)
    part_of_group = assign_groups(groups, labels, sizes, fractions, np.random.default_rng(seed))
    lookup = np.zeros(int(groups.max()) + 1, dtype=np.int64)
    lookup[groups] = part_of_group
    return lookup[group_of]


def check_enough_groups(data: ImageSet, group_of: np.ndarray, k: int) -> None:
    """Every class needs at least ``k`` groups, or some fold would hold none of its images."""
    groups, labels, _ = group_labels(data, group_of)
    counts = np.bincount(labels, minlength=data.num_classes)
    short = {data.class_names[c]: int(n) for c, n in enumerate(counts) if n < k}
    if short:
        raise config.ParamsError(f"cv.folds: {k} folds need at least {k} independent images (duplicate groups) of "
                                 f"every class in train + val; these have fewer: {short}. Use fewer folds.")


def assign_folds(pool: ImageSet, k: int, seed: int, max_distance: int) -> np.ndarray:
    """Fold number (0..k-1) of each pool image: duplicate groups kept whole, stratified by label, seeded."""
    group_of = group_images(pool, max_distance).group_of
    check_enough_groups(pool, group_of, k)
    return deal_groups(pool, group_of, (1.0 / k,) * k, seed)


def fold_sets(pool: ImageSet, fold_of: np.ndarray, fold: int, inner_val: float, seed: int,
              max_distance: int) -> dict[str, ImageSet]:
    """The held-out images of ``fold`` and the other folds cut into training images and inner validation."""
    rest = pool.subset(np.flatnonzero(fold_of != fold))
    inner = deal_groups(rest, group_images(rest, max_distance).group_of, (1.0 - inner_val, inner_val),
                        [seed, fold])
    return {"train": rest.subset(np.flatnonzero(inner == 0)), "val": rest.subset(np.flatnonzero(inner == 1)),
            "heldout": pool.subset(np.flatnonzero(fold_of == fold))}


def folds_record(pool: ImageSet, fold_of: np.ndarray, cv: CVConfig, sizes: dict[int, dict[str, dict]]) -> dict:
    return {
        "folds": cv.k,
        "inner_val": cv.inner_val,
        "pool_images": len(pool),
        "per_fold": {str(f): sizes[f] for f in sorted(sizes)},
        "fold_of": fold_of.tolist(),   # per pool image: the train split's images, then the validation split's
    }


def run(params: dict, paths: FoldsPaths) -> dict:
    """Write ``cv.folds`` folds of train + val (nothing but ``folds.json`` when ``cv.folds`` is empty)."""
    cv = config.load_section(params, "cv", CVConfig)
    split = config.load_section(params, "split", SplitConfig)
    augment = config.load_section(params, "augment", AugmentConfig)
    seed = config.global_seed(params)
    if not cv.k:   # hold-out only: a record no other setting changes, so evaluate (which reads it) never reruns for it
        with atomic_dir(paths.out) as out:
            write_json(out / FOLDS_RECORD, {"folds": 0})
        return {}
    pool = concatenate([ImageSet.load(paths.train), ImageSet.load(paths.val)])
    fold_of = assign_folds(pool, cv.k, split.seed, split.near_duplicate_distance)
    sizes: dict[int, dict[str, dict]] = {}
    with atomic_dir(paths.out) as out:
        for fold in cv.folds:
            sets = fold_sets(pool, fold_of, fold, cv.inner_val, split.seed, split.near_duplicate_distance)
            folder = fold_file(out, fold, "heldout").parent
            folder.mkdir(parents=True)
            for name, part in sets.items():
                part.save(fold_file(out, fold, name))
            sets["train_augmented"] = write_augmented(sets["train"], augment, seed,
                                                      fold_file(out, fold, "train_augmented"))
            write_json(folder / "normalization.json", normalization_stats(sets["train"].images, split.normalization))
            sizes[fold] = {name: {"total": len(sets[name]), **sets[name].class_counts()} for name in FOLD_SETS}
            log.info("fold %d: %s", fold, {name: len(s) for name, s in sets.items()})
        write_json(out / FOLDS_RECORD, folds_record(pool, fold_of, cv, sizes))
    return sizes
