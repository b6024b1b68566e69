"""Out-of-fold predictions under k-fold cross-validation (``cv.folds``; the ``folds`` stage writes the folds).

Every train + val image sits in exactly one fold's ``heldout/`` image set, and fold ``f``'s model never trained on it
nor chose its epoch with it. Predicting each fold's held-out images with that fold's model alone gives one
out-of-fold prediction per image: a comparison of two models then rests on the whole pool (e.g. 648 busi
images) instead of the test split's 114. The pool's order is the folds' order (fold 0's images, then
fold 1's, ...); images are matched across revisions by source file and label, as on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.config import CVConfig, ParamsError
from medpipe.data.imageset import ImageSet, concatenate, fold_file, images_with_lesion
from medpipe.evaluation import compare
from medpipe.io import read_json
from medpipe.predictors import FoldAverage, ModelFile, ModelLoadError
from medpipe.segmentation.metrics import per_image_scores

FOLDS_RECORD = "folds.json"   # the folds stage's record (medpipe.data.folds, which evaluate does not import)

@dataclass(frozen=True)
class Folds:
    """The held-out images of each fold, in fold order."""

    heldout: tuple[ImageSet, ...]

    @property
    def k(self) -> int:
        return len(self.heldout)

    @cached_property
    def pool(self) -> ImageSet:
        """Every train + val image once, in fold order: what the out-of-fold predictions are of."""
        return concatenate(list(self.heldout))


def load_folds(folds_dir: Path, cv: CVConfig) -> Folds:
    """The ``folds`` stage's held-out sets; an error naming ``cv.folds`` if they were written for another k."""
    record = Path(folds_dir) / FOLDS_RECORD
    written = read_json(record).get("folds") if record.is_file() else None
    if written != cv.k:
        raise ParamsError(f"{folds_dir} holds {written} folds but cv.folds asks for {cv.k}: run the folds stage "
                          "first (dvc repro)")
    return Folds(tuple(ImageSet.load(fold_file(folds_dir, f, "heldout")) for f in cv.folds))


def members(model: Any, mf: ModelFile, folds: Folds) -> tuple[Any, ...]:
    if not isinstance(model, FoldAverage) or len(model.members) != folds.k:
        raise ModelLoadError(f"{mf.path}: {mf.name} has no model for each of the {folds.k} folds (cv.folds): "
                          "run the fold training stages (dvc repro)")
    return model.members


def classifier_proba(model: Any, mf: ModelFile, folds: Folds) -> np.ndarray:
    """(N_pool, C) out-of-fold class probabilities: each fold's images by that fold's model."""
    return np.concatenate([np.asarray(m.predict_proba(h.images), dtype=np.float64)
                           for m, h in zip(members(model, mf, folds), folds.heldout, strict=True)])


def lesion_images(data: ImageSet) -> np.ndarray:
    """Positions of the images whose mask has a lesion (the segmenter metrics are defined on those)."""
    return images_with_lesion(data.masks)


def segmenter_scores(model: Any, mf: ModelFile, folds: Folds, cleanup) -> dict[str, np.ndarray]:
    """{metric: (N_pool,) per-image out-of-fold Dice, IoU, HD95}: each fold's images by that fold's model."""
    parts = [per_image_scores(h.masks, m.predict_masks(h.images, cleanup))
             for m, h in zip(members(model, mf, folds), folds.heldout, strict=True)]
    return {metric: np.concatenate([np.asarray(p[metric], dtype=np.float64) for p in parts])
            for metric in compare.SEGMENTER_METRICS}


def classifier_predictions(pool: ImageSet, seeds: list[int], probas: list[np.ndarray]) -> compare.Predictions:
    """A classifier's out-of-fold predictions, one (N_pool, C) array per training seed."""
    return compare.Predictions(
        kind=compare.CLASSIFIER, seeds=tuple(seeds), images=np.arange(len(pool)),
        sources=tuple(str(s) for s in pool.source_ids), labels=pool.labels, class_names=pool.class_names,
        proba=np.stack(probas),
    )


def segmenter_predictions(pool: ImageSet, seeds: list[int], scores: list[dict[str, np.ndarray]]
                          ) -> compare.Predictions:
    """A segmenter's out-of-fold per-image scores on the pool's lesion images, one set per training seed."""
    lesion = lesion_images(pool)
    return compare.Predictions(
        kind=compare.SEGMENTER, seeds=tuple(seeds), images=lesion,
        sources=tuple(str(pool.source_ids[i]) for i in lesion),
        scores={m: np.stack([s[m][lesion] for s in scores]) for m in compare.SEGMENTER_METRICS},
    )


def fold_record(mf: ModelFile) -> dict[str, Any]:
    """A model file for ``medpipe-predict``: the fold models' equal-weight average (the test split's model)."""
    return {"model": mf.name, "seed": mf.seed, "folds": len(mf.folds),
            "members": [{"model": mf.name, "file": str(path), "weight": 1} for path in mf.folds]}
