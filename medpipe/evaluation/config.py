"""The ``evaluate`` section of params.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medpipe.config import Strict, ValidationMetric


class TTAConfig(Strict):
    enabled: bool = True
    hflip: bool = True            # add a horizontally flipped view
    vflip: bool = False           # add a vertically flipped view (ultrasound has a fixed top: off by default)
    rot90: bool = False           # each view also turned by 90, 180, 270 degrees (square images without a fixed
                                  # orientation: microscopy, dermoscopy); with hflip, the 8 symmetries of the square
    noise_copies: int = Field(0, ge=0, le=32)     # views with Gaussian pixel noise (one field for all channels)
    noise_std: float = Field(0.02, ge=0, le=0.5)  # on the 0-1 intensity scale


class EnsembleConfig(Strict):
    """The soft vote of all classifiers (medpipe/evaluation/ensemble.py), chosen on the validation split."""

    enabled: bool = True
    rounds: int = Field(25, ge=1, le=1000)   # greedy selection rounds (with replacement): weights in 1/rounds steps
    folds: int = Field(5, ge=2, le=20)       # cross-fitting folds of the validation score that competes for champion
    calibrate: bool = True                   # temperature-scale the vote (T fitted on its validation probabilities)


class EvaluateConfig(Strict):
    bootstrap_resamples: int = Field(1000, ge=0, le=100_000)  # 0 = no confidence intervals
    grid_images: int = Field(12, ge=0, le=100)  # test images in each segmenter's contour figure
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap_seed: int = Field(0, ge=0)
    ece_bins: int = Field(15, ge=2, le=100)
    temperature_scaling: bool = True   # fit T on the validation split, report calibration before/after
    tta: TTAConfig = TTAConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    # validation metric that picks the champion; auto: the one the dataset's benchmark reports (datasets.yaml
    # `benchmark_metric`), else balanced_accuracy
    champion_metric: ValidationMetric | Literal["auto"] = "auto"
    # best_mean: the best mean reference score wins; prefer_ensemble: the ensemble, unless the best model beats it on
    # the reference images by a paired interval that excludes 0 (docs/comparing.md)
    champion_choice: Literal["best_mean", "prefer_ensemble"] = "prefer_ensemble"
    gradcam: bool = True
    gradcam_per_class: int = Field(3, ge=0, le=20)  # test images per class in the Grad-CAM figure
    gradcam_method: Literal["gradcam", "gradcam++", "layercam"] = "gradcam"
