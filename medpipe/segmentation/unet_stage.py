"""The ``train_segmenter`` stage: one segmenter of ``segmenters`` (the U-Net, ``arch: unet`` in ``models``),
trained with one seed on the training masks.

The output folder, the MLflow run and data-parallel training are :mod:`medpipe.training.runner`'s; this
module validates the U-Net's entry and trains it (:func:`medpipe.segmentation.train.train_unet`). A dataset
without masks, or without a lesion in its training masks, is not an error: ``validation.json`` says why
nothing was trained, so ``dvc repro`` goes through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medpipe import config
from medpipe.data.imageset import missing_masks
from medpipe.segmentation.predictor import UNetSegmenter, input_normalization
from medpipe.segmentation.train import batch_dice, train_unet
from medpipe.segmentation.unet_config import UNetSpec
from medpipe.training import runner
from medpipe.training.config import TrainConfig
from medpipe.training.loop import FitResult
from medpipe.training.runner import DeepStage, Splits, TrainPaths


def model_spec(params: dict, name: str) -> UNetSpec:
    """``models.<name>`` validated as a U-Net (a classifier's entry is refused: it trains in ``train``)."""
    if ((params.get("models") or {}).get(name) or {}).get("arch", "unet") != "unet":
        raise config.ParamsError(f"params.yaml: models.{name} is a classifier: list it in `classifiers`, "
                                 "not in `segmenters`")
    return runner.model_spec(params, name, UNetSpec)


def fit_unet(name: str, spec: UNetSpec, cfg: TrainConfig, splits: Splits, seed: int, checkpoint: Path | None,
             on_epoch) -> tuple[UNetSegmenter, FitResult]:
    """Train the U-Net; returns the segmenter (best weights) and the fit result."""
    train, val, norm = splits
    config.seed_everything(seed, deterministic=cfg.deterministic)
    model, result = train_unet(train.images, train.masks, val.images, val.masks, spec, cfg, norm["mean"],
                               norm["std"], seed, checkpoint_path=checkpoint, on_epoch=on_epoch,
                               batch_metrics=batch_dice)
    mean, std = input_normalization(spec, norm["mean"], norm["std"])
    frozen = spec.model_copy(update={"pretrained": False})
    return UNetSegmenter(model, frozen, mean, std, cfg.precision, cfg.channels_last), result


STAGE = DeepStage("stages.train_segmenter", "medpipe.segmentation.predictor", fit_unet, missing_masks)


def run(params: dict, paths: TrainPaths) -> dict[str, Any]:
    """Train segmenter ``paths.model`` with ``paths.seed``; write ``model.pt`` and ``validation.json``."""
    spec = model_spec(params, paths.model)
    cfg = spec.train_config(config.load_section(params, "train", TrainConfig))
    return runner.run(STAGE, params, spec, cfg, paths)
