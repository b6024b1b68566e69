"""Which medpipe code each stage may use, written down once: an import across the line fails here with the reason.

``tests/test_dag.py`` keeps ``dvc.yaml`` equal to what each stage imports; this test keeps what each stage
imports equal to what it is meant to import. A stage reruns when any module it imports changes, so an import
that crosses a line below (the U-Net's training reaching a classifier's code, a classical stage reaching the
deep-learning engine) makes an edit of one model retrain another. The small core may reach every stage.
"""

from __future__ import annotations

import pytest

from tests.test_dag import ROOT, closure, script_of, stage_definitions

# what every stage may use: errors, files, paths, params, the command line, the image-array format
CORE = ("medpipe/__init__.py", "medpipe/errors.py", "medpipe/io.py", "medpipe/paths.py", "medpipe/config.py",
        "medpipe/cli.py", "medpipe/data/__init__.py", "medpipe/data/imageset.py")

TRACKING = ("medpipe/tracking/__init__.py", "medpipe/tracking/runs.py", "medpipe/tracking/models.py")
# the frozen EfficientNet-Lite0 backbone and its weights (classical embedding features, transfer classifiers,
# U-Net encoders)
BACKBONE = ("medpipe/models/__init__.py", "medpipe/models/efficientnet.py", "medpipe/models/errors.py",
            "medpipe/models/weights.py", "medpipe/models/transfer.py", "medpipe/models/attention.py")
# the shared deep-learning engine: recipe, batches, loop, device, data-parallel plumbing, the stage runner
ENGINE = ("medpipe/training/__init__.py", "medpipe/training/config.py", "medpipe/training/data.py",
          "medpipe/training/augment.py", "medpipe/training/loop.py", "medpipe/training/optim.py",
          "medpipe/training/device.py", "medpipe/training/distributed.py", "medpipe/training/checkpoint.py",
          "medpipe/training/runner.py", "medpipe/runtime.py", "medpipe/tracking/curves.py")
# every saved model's loader and the code it runs (what evaluate loads and scores)
LOADERS = ("medpipe/predictors.py", "medpipe/training/predictor.py", "medpipe/segmentation/predictor.py",
           "medpipe/classical/predictor.py", "medpipe/segmentation/pixel_classifier.py",
           "medpipe/classical/models.py", "medpipe/classical/features.py", "medpipe/classical/config.py",
           "medpipe/classical/__init__.py", "medpipe/segmentation/unet.py", "medpipe/segmentation/unet_config.py",
           "medpipe/segmentation/config.py", "medpipe/segmentation/postprocess.py", "medpipe/segmentation/__init__.py",
           "medpipe/training/__init__.py", "medpipe/training/config.py", "medpipe/training/data.py",
           "medpipe/training/augment.py", "medpipe/training/device.py", "medpipe/training/checkpoint.py",
           "medpipe/models/")

# stage -> (the modules and folders, ending in "/", it may import besides CORE; why that and nothing else)
MAY_USE: dict[str, tuple[tuple[str, ...], str]] = {
    "download": (("medpipe/data/download.py", "medpipe/data/sources.py", "medpipe/data/registry.py"),
                 "download fetches and verifies the dataset's files; it knows no image, model or training"),
    "preprocess": (("medpipe/data/preprocess.py", "medpipe/data/imaging.py", "medpipe/data/registry.py"),
                   "preprocess decodes and crops images; it knows no split, model or training"),
    "split": (("medpipe/data/splitting.py",), "split groups and splits the image arrays, nothing else"),
    "augment": (("medpipe/data/augment.py",), "augment transforms the training split, nothing else"),
    "folds": (("medpipe/data/folds.py", "medpipe/data/splitting.py", "medpipe/data/augment.py"),
              "folds groups, deals and augments the train + val images as split and augment do, nothing else"),
    "train": (("medpipe/training/", "medpipe/models/", "medpipe/metrics.py", *ENGINE, *TRACKING),
              "a deep classifier trains on the shared engine and the architecture registry; no segmenter, "
              "classical model or evaluation code, so editing those never retrains a classifier"),
    "train_segmenter": (("medpipe/segmentation/unet_stage.py", "medpipe/segmentation/unet.py",
                         "medpipe/segmentation/unet_config.py", "medpipe/segmentation/train.py",
                         "medpipe/segmentation/predictor.py", "medpipe/segmentation/losses.py",
                         "medpipe/segmentation/metrics.py", "medpipe/segmentation/postprocess.py",
                         "medpipe/segmentation/config.py", "medpipe/segmentation/__init__.py",
                         "medpipe/models/", *ENGINE, *TRACKING),
                        "the U-Net trains on the shared engine with registry encoders; never a classifier's "
                        "training code (training/classify.py, training/stage.py) nor the pixel classifier"),
    "train_pixel_classifier": (("medpipe/segmentation/pixel_classifier_stage.py",
                                "medpipe/segmentation/pixel_classifier.py", "medpipe/segmentation/config.py",
                                "medpipe/segmentation/metrics.py", "medpipe/segmentation/postprocess.py",
                                "medpipe/segmentation/__init__.py", *TRACKING),
                               "the pixel classifier is scikit-learn: no U-Net, no torch training engine, no "
                               "architecture, so editing deep-learning code never refits it"),
    "train_classical": (("medpipe/classical/", "medpipe/metrics.py", *BACKBONE, *TRACKING),
                        "the classical models use their features (with the frozen EfficientNet-Lite0 backbone) and "
                        "scikit-learn; no deep training engine, classifier head registry or segmentation"),
    "evaluate": (("medpipe/evaluation/", "medpipe/metrics.py", "medpipe/segmentation/metrics.py",
                  "medpipe/segmentation/viz.py", "medpipe/data/registry.py", *LOADERS, *TRACKING),
                 "evaluate loads and scores models: their loaders and prediction code, never a training stage "
                 "(training loop, optimiser, fit code), so a change there reaches it only through new models; "
                 "the registry gives the dataset's benchmark metric"),
}

# a training stage on a cross-validation fold runs the same script as its hold-out stage, on the fold's data
MAY_USE |= {f"{stage}_fold": MAY_USE[stage] for stage in ("train", "train_segmenter", "train_classical")}


def allowed(module: str, rules: tuple[str, ...]) -> bool:
    return any(module == rule or (rule.endswith("/") and module.startswith(rule)) for rule in (*CORE, *rules))


def test_every_stage_has_a_rule():
    assert set(MAY_USE) == set(stage_definitions())


@pytest.mark.parametrize("name", sorted(stage_definitions()))
def test_stage_imports_only_what_it_may_use(name):
    rules, reason = MAY_USE[name]
    crossing = sorted(m for m in closure(script_of(stage_definitions()[name])) if not allowed(m, rules))
    assert not crossing, f"stage {name} imports {crossing}, across its line: {reason}"


def test_a_crossing_import_is_caught():
    """The rule is not vacuous: the U-Net's stage importing a classifier's training code would fail."""
    rules, _ = MAY_USE["train_segmenter"]
    assert not allowed("medpipe/training/classify.py", rules) and not allowed("medpipe/evaluation/stage.py", rules)
    assert allowed("medpipe/segmentation/unet.py", rules)
    assert all((ROOT / rule).exists() for stage_rules, _ in MAY_USE.values() for rule in stage_rules)
