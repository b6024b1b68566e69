"""The `folds` stage: k grouped, stratified, seeded folds of train + val, with a leak-free inner validation."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medpipe.config import ParamsError
from medpipe.data.folds import FOLD_SETS, FoldsPaths, run
from medpipe.data.imageset import ImageSet, fold_file
from tests.conftest import distinct, make_set

CLASSES = ("benign", "malignant", "normal")


def write_pool(root: Path, duplicate: bool = False) -> tuple[ImageSet, ImageSet]:
    """train (30 + 15 + 12 images) and val (6 + 4 + 3); with ``duplicate``, train's image t0 has a
    pixel-identical copy in val (the same content hash), as a near-duplicate missed by the split would."""
    train = distinct(make_set((30, 15, 12), size=16, seed=0, masks=True), "t", 0)
    val = distinct(make_set((6, 4, 3), size=16, seed=1, masks=True), "v", 1)
    if duplicate:
        hashes = val.content_hashes.copy()
        hashes[0] = train.content_hashes[0]
        val = dataclasses.replace(val, content_hashes=hashes)
    root.mkdir(parents=True, exist_ok=True)
    train.save(root / "train")
    val.save(root / "val")
    return train, val


def params(folds: list[int], **cv) -> dict:
    return {"dataset": "tiny", "seed": 42, "cv": {"folds": folds, **cv},
            "split": {"seed": 42, "near_duplicate_distance": 4}, "augment": {"rotate_degrees": 5}}


def fold_paths(root: Path) -> FoldsPaths:
    return FoldsPaths(train=root / "train", val=root / "val", out=root / "folds")


def load_fold(root: Path, fold: int) -> dict[str, ImageSet]:
    return {name: ImageSet.load(fold_file(root / "folds", fold, name)) for name in FOLD_SETS}


def test_every_image_is_held_out_exactly_once_and_never_trains_its_own_fold(tmp_path):
    train, val = write_pool(tmp_path)
    run(params([0, 1, 2]), fold_paths(tmp_path))
    pool = set(train.source_ids) | set(val.source_ids)
    held = Counter()
    for fold in range(3):
        sets = load_fold(tmp_path, fold)
        heldout, fit, inner = (set(sets[n].source_ids) for n in ("heldout", "train", "val"))
        held.update(heldout)
        assert heldout | fit | inner == pool
        assert not heldout & fit and not heldout & inner and not fit & inner
        # augmented copies come from the fold's training images only
        bases = {s.split("#aug")[0] for s in sets["train_augmented"].source_ids}
        assert bases == fit
        assert len(set(sets["train_augmented"].class_counts().values())) == 1  # balanced
        norm = json.loads((tmp_path / "folds" / f"fold{fold}" / "normalization.json").read_text())
        expected = sets["train"].images.reshape(-1, 3).astype(np.float64).mean(axis=0) / 255
        assert norm["mean"] == pytest.approx(expected, abs=1e-5)
    assert held == Counter({s: 1 for s in pool})


def test_folds_are_stratified_and_the_inner_validation_is_its_share(tmp_path):
    write_pool(tmp_path)
    run(params([0, 1, 2], inner_val=0.2), fold_paths(tmp_path))
    for fold in range(3):
        sets = load_fold(tmp_path, fold)
        assert sets["heldout"].class_counts() == pytest.approx({"benign": 12, "malignant": 19 / 3, "normal": 5},
                                                                abs=1)
        rest = len(sets["train"]) + len(sets["val"])
        assert len(sets["val"]) == pytest.approx(0.2 * rest, abs=3)
    record = json.loads((tmp_path / "folds/folds.json").read_text())
    assert record["folds"] == 3 and record["pool_images"] == 70 and sorted(set(record["fold_of"])) == [0, 1, 2]


def test_a_duplicate_group_stays_in_one_fold(tmp_path):
    write_pool(tmp_path, duplicate=True)
    run(params([0, 1, 2, 3]), fold_paths(tmp_path))
    for fold in range(4):
        sets = load_fold(tmp_path, fold)
        held, rest = set(sets["heldout"].source_ids), set(sets["train"].source_ids) | set(sets["val"].source_ids)
        assert {"t0", "v0"} <= held or {"t0", "v0"} <= rest   # never one on each side


def test_the_same_params_give_the_same_bytes_and_another_seed_other_folds(tmp_path):
    write_pool(tmp_path)
    run(params([0, 1]), fold_paths(tmp_path))
    first = {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "folds").rglob("*")) if p.is_file()}
    run(params([0, 1]), fold_paths(tmp_path))
    second = {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "folds").rglob("*"))
              if p.is_file()}
    assert first == second
    other = params([0, 1])
    other["split"]["seed"] = 7
    run(other, fold_paths(tmp_path))
    assert json.loads((tmp_path / "folds/folds.json").read_text())["fold_of"] != \
        json.loads(first[Path("folds/folds.json")])["fold_of"]


def test_hold_out_only_writes_the_record_alone(tmp_path):
    write_pool(tmp_path)
    run(params([]), fold_paths(tmp_path))
    assert [p.name for p in (tmp_path / "folds").iterdir()] == ["folds.json"]
    assert json.loads((tmp_path / "folds/folds.json").read_text())["folds"] == 0


@pytest.mark.parametrize("folds, message", [
    ([0], "k >= 2"),
    ([1, 2, 3], "0..k-1"),
    ([0, 0], "0..k-1"),
    (5, "cv.folds"),
])
def test_bad_fold_numbers_are_refused_naming_the_param(tmp_path, folds, message):
    write_pool(tmp_path)
    with pytest.raises(ParamsError, match=message):
        run(params(folds), fold_paths(tmp_path))
    assert not (tmp_path / "folds").exists()


def test_more_folds_than_images_of_a_class_is_refused_before_any_work(tmp_path):
    write_pool(tmp_path)
    with pytest.raises(ParamsError, match=r"cv.folds: 16 folds .*'normal': 15"):
        run(params(list(range(16))), fold_paths(tmp_path))
    assert not (tmp_path / "folds").exists()
