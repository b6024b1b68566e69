"""The generic training loop, batches, online augmentation, checkpoints, class imbalance, the ``train``
stage end to end for a classifier (with MLflow against a temporary store), its byte-stable outputs and
the validation of ``train``/``models`` (the U-Net's stage, ``train_segmenter``, is in test_segmentation.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from medpipe import config
from medpipe.data.imageset import ImageSet
from medpipe.training import classify, stage
from medpipe.training.augment import BatchAugment
from medpipe.training.checkpoint import load_checkpoint, resume, save_checkpoint
from medpipe.training.config import ClassifierSpec, OnlineAugmentConfig, TrainConfig, UnfreezeConfig
from medpipe.training.data import ArrayBatches, class_weights, sample_weights
from medpipe.training.loop import EarlyStopping, MonitorError, fit
from medpipe.training.predictor import TorchClassifier

CLASSES = ("benign", "malignant", "normal")


def easy_images(n_per_class: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class k is a noisy image whose channel k is bright: trivially separable."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    images = rng.integers(0, 80, size=(len(labels), size, size, 3)).astype(np.uint8)
    images[np.arange(len(labels)), :, :, labels] += 150
    return images, labels.astype(np.int64)


def imageset(images: np.ndarray, labels: np.ndarray, masks: np.ndarray | None = None) -> ImageSet:
    n = len(labels)
    ids = np.array([f"img{i}" for i in range(n)])
    return ImageSet(images=images, labels=labels, class_names=CLASSES, source_ids=ids, groups=np.array([""] * n),
                    content_hashes=ids, phashes=np.arange(n, dtype=np.uint64), source_splits=np.array([""] * n),
                    masks=masks)


def with_lesions(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The images with a white 6x6 square each (a 'lesion' for the U-Net) and its 0/1 mask."""
    rng = np.random.default_rng(seed)
    images, masks = images.copy(), np.zeros(images.shape[:3], np.uint8)
    for image, mask in zip(images, masks, strict=True):
        top, left = rng.integers(1, images.shape[1] - 7, size=2)
        mask[top:top + 6, left:left + 6] = 1
        image[mask == 1] = 255
    return images, masks


def fast_train(**changes) -> dict:
    base = dict(lr=3e-3, epochs=4, batch_size=16, precision="fp32", channels_last=False, patience=10, threads=1,
                augment={"hflip": True, "vflip": False, "rot90": False, "rotate_degrees": 0, "scale": 0,
                         "translate": 0, "brightness": 0.0, "contrast": 0.0})
    return {**base, **changes}


# ---------------------------------------------------------------- loop pieces

def test_early_stopping_waits_patience_epochs_after_the_best():
    stopper = EarlyStopping("max", patience=2)
    stops = [stopper.step(v, e) for e, v in enumerate([0.5, 0.6, 0.55, 0.6], start=1)]
    assert stops == [False, False, False, True]
    assert (stopper.best, stopper.best_epoch) == (0.6, 2)
    low = EarlyStopping("min", patience=1, min_delta=0.1)
    assert not low.step(1.0, 1) and low.step(0.95, 2)  # an improvement smaller than min_delta does not count


def test_early_stopping_ignores_nan():
    stopper = EarlyStopping("max", patience=3)
    stopper.step(float("nan"), 1)
    assert stopper.best is None and stopper.is_improvement(0.1)


def test_fit_keeps_the_best_epoch_and_stops_early(tmp_path):
    """A scripted validation score: best at epoch 2, then patience 2 ends the run at epoch 4."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.95])
    snapshots = []

    def val_fn(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"auc": next(scores)}

    cfg = TrainConfig(epochs=5, patience=2, monitor="auc", precision="fp32", channels_last=False,
                      scheduler="plateau")
    result = fit(model, batches, nn.functional.cross_entropy, val_fn, cfg, checkpoint_path=tmp_path / "m.pt")
    assert result.best_epoch == 2 and len(result.history) == 4 and result.stopped_early
    assert result.best_metrics == {"auc": 0.9}
    assert torch.equal(model.weight, snapshots[1]["weight"])  # best weights restored
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["epoch"] == 2 and ckpt["metrics"] == {"auc": 0.9}
    assert torch.equal(ckpt["model"]["weight"], snapshots[1]["weight"])
    assert ckpt["optimizer"]["state"] and ckpt["scheduler"] is not None and ckpt["config"]["monitor"] == "auc"
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4] and "train_loss" in result.history[0]


def test_fit_names_the_missing_monitor_metric():
    cfg = TrainConfig(epochs=1, monitor="dice", precision="fp32", channels_last=False)
    with pytest.raises(MonitorError, match="dice.*loss"):
        fit(nn.Linear(2, 2), [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))],
            nn.functional.cross_entropy, lambda m: {"loss": 1.0}, cfg)


def test_fit_is_generic_over_targets_and_losses():
    """A regression model with MSE on float targets, monitored by a 'min' metric: no classification assumed."""
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    model = nn.Linear(3, 1)
    cfg = TrainConfig(epochs=30, lr=0.05, monitor="mse", monitor_mode="min", precision="fp32",
                      channels_last=False, scheduler="none", weight_decay=0)
    result = fit(model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], nn.functional.mse_loss,
                 lambda m: {"mse": float(nn.functional.mse_loss(m(x), y))}, cfg)
    assert result.best_metrics["mse"] < 0.05
    assert result.history[0]["val_mse"] > result.best_metrics["mse"]


def three_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(8, 4, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1] * 4))
            for i in range(3)]


def test_weight_averaging_validates_keeps_and_checkpoints_the_moving_average(tmp_path):
    """ema_decay 0.5: validation sees 0.5 * average + 0.5 * new weights after every step (the first step's
    weights to start), the raw weights train exactly as without it, and the best average is what is kept."""
    def run(ema_decay: float, path):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        batches = three_batches()
        seen, scores = [], iter([0.5, 0.9, 0.7, 0.6])

        def val_fn(m):
            seen.append({k: v.clone() for k, v in m.state_dict().items()})
            return {"auc": next(scores)}

        cfg = TrainConfig(epochs=4, patience=10, monitor="auc", precision="fp32", channels_last=False,
                          scheduler="none", optimizer="sgd", lr=0.1, ema_decay=ema_decay)
        fit(model, batches, nn.functional.cross_entropy, val_fn, cfg, checkpoint_path=path)
        return model, seen

    _, raw = run(0.0, None)
    model, averaged = run(0.5, tmp_path / "m.pt")
    # the raw weights after each epoch (3 steps each) are not observable directly: rebuild them step by step
    torch.manual_seed(0)
    probe = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    batches = three_batches()
    expected, ema = [], None
    for _ in range(4):
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(probe(x), y).backward()
            optimizer.step()
            now = {k: v.detach().clone() for k, v in probe.state_dict().items()}
            ema = now if ema is None else {k: 0.5 * ema[k] + 0.5 * now[k] for k in now}
        expected.append(ema)
        assert all(torch.allclose(now[k], raw[len(expected) - 1][k], atol=1e-6) for k in now)  # raw run
    for got, want in zip(averaged, expected, strict=True):
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    assert not torch.allclose(averaged[1]["weight"], raw[1]["weight"])
    assert torch.equal(model.weight, averaged[1]["weight"])   # best epoch (2) of the average, restored
    assert torch.equal(load_checkpoint(tmp_path / "m.pt")["model"]["weight"], averaged[1]["weight"])


def test_onecycle_steps_every_batch_warming_up_then_annealing_keeping_group_ratios():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(5)]
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters(), "lr": 1.0}]
    cfg = TrainConfig(epochs=6, lr=0.01, scheduler="onecycle", onecycle_pct_start=0.3, patience=10,
                      precision="fp32", channels_last=False)
    result = fit(model, batches, nn.functional.cross_entropy, lambda m: {"balanced_accuracy": 0.5}, cfg,
                 param_groups=groups)
    lrs = [r["lr"] for r in result.history]   # group 0's lr at the start of each epoch: peak 0.1 * train.lr
    peak = lrs.index(max(lrs))
    assert lrs[0] < 0.001 / 10 and 0 < peak < len(lrs) - 1 and lrs[-1] < lrs[peak] / 2
    assert 0.0005 < max(lrs) <= 0.001 + 1e-12


def test_onecycle_needs_batches_of_known_length():
    cfg = TrainConfig(epochs=1, scheduler="onecycle", precision="fp32", channels_last=False)
    batches = ((torch.randn(4, 2), torch.zeros(4, dtype=torch.long)) for _ in range(2))
    with pytest.raises(ValueError, match="onecycle"):
        fit(nn.Linear(2, 2), batches, nn.functional.cross_entropy, lambda m: {"balanced_accuracy": 1.0}, cfg)


def test_checkpoint_round_trip_restores_training_state(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, scheduler=sched, epoch=3,
                    config={"lr": 0.1}, metrics={"acc": 0.5}, extra={"class_names": ["a", "b"]})
    fresh = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_sched = torch.optim.lr_scheduler.CosineAnnealingLR(fresh_opt, T_max=5)
    state = resume(tmp_path / "c.pt", fresh, fresh_opt, fresh_sched)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh_sched.last_epoch == 1 and fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert state["epoch"] == 3 and state["extra"]["class_names"] == ["a", "b"]


def test_checkpoint_load_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a medpipe checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="run the training stage"):
        load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------- imbalance

def test_class_weights_auto_explicit_and_none():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    auto = class_weights(labels, 3, "auto")
    assert torch.allclose(auto, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    assert (auto * torch.tensor([6.0, 3.0, 1.0])).allclose(torch.full((3,), 10 / 3))  # equal total weight
    assert class_weights(labels, 3, [0.1, 3.0, 4.0]).tolist() == pytest.approx([0.1, 3.0, 4.0])
    assert class_weights(labels, 3, "none") is None
    with pytest.raises(config.ParamsError, match="3 classes"):
        class_weights(labels, 3, [1.0, 2.0])


def test_weighted_sampler_balances_classes():
    labels = np.array([0] * 90 + [1] * 10)
    assert sample_weights(labels, 2)[[0, 95]].tolist() == pytest.approx([1 / 90, 1 / 10])
    images = np.zeros((100, 4, 4, 3), np.uint8)
    batches = ArrayBatches(images, labels, batch_size=100, balanced_sampler=True, seed=1)
    drawn = np.concatenate([y.numpy() for _ in range(20) for _, y in batches])
    assert 0.4 < drawn.mean() < 0.6  # the 10 % class is drawn about half of the time


# ---------------------------------------------------------------- batches and augmentation

def test_batches_are_normalised_resized_and_reproducible():
    images, labels = easy_images(4, size=16)
    kwargs = dict(batch_size=5, mean=[0.5] * 3, std=[0.25] * 3, size=8, shuffle=True, seed=3)
    a = [(x, y) for x, y in ArrayBatches(images, labels, **kwargs)]
    b = [(x, y) for x, y in ArrayBatches(images, labels, **kwargs)]
    assert [x.shape for x, _ in a] == [(5, 3, 8, 8), (5, 3, 8, 8), (2, 3, 8, 8)]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(labels.tolist())  # each image once per epoch
    full = next(iter(ArrayBatches(images[:1], labels[:1], batch_size=1, mean=[0.5] * 3, std=[0.25] * 3)))[0]
    expected = (images[0].astype(np.float32) / 255 - 0.5) / 0.25
    assert np.allclose(full[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert len(ArrayBatches(images, labels, batch_size=5, drop_last=True)) == 2


def test_mixed_batches_pair_each_batch_and_give_class_probabilities():
    images, labels = easy_images(8)
    cfg = TrainConfig(mixup_alpha=0.4, cutmix_alpha=1.0, batch_size=8)
    plain = ArrayBatches(images, labels, batch_size=8, shuffle=True, seed=3)
    config.seed_everything(0)
    mixed = list(classify.MixedBatches(ArrayBatches(images, labels, batch_size=8, shuffle=True, seed=3), cfg, 3))
    config.seed_everything(0)
    again = list(classify.MixedBatches(ArrayBatches(images, labels, batch_size=8, shuffle=True, seed=3), cfg, 3))
    assert len(mixed) == len(plain) == 3
    for (x, target), (x2, target2), (raw, y) in zip(mixed, again, plain, strict=True):
        assert torch.equal(x, x2) and torch.equal(target, target2)             # seeded: the same mix again
        assert target.shape == (8, 3) and torch.allclose(target.sum(1), torch.ones(8))
        lam = float(target[torch.arange(8), y].min())                          # share of each image's own class
        assert 0 <= lam <= 1 and not torch.equal(x, raw)
        flipped = nn.functional.one_hot(y.flip(0), 3).float()
        assert torch.allclose(target, lam * nn.functional.one_hot(y, 3).float() + (1 - lam) * flipped, atol=1e-6)
    assert classify.accuracy(torch.eye(3)[[0, 1]], torch.tensor([[0.7, 0.3, 0.0], [0.6, 0.4, 0.0]])) == \
        {"accuracy": 0.5}


def test_mixing_needs_an_even_batch_and_is_off_by_default():
    assert not TrainConfig().mixes and TrainConfig(mixup_alpha=0.2).mixes and not TrainConfig(
        mixup_alpha=0.2, mix_prob=0).mixes
    with pytest.raises(ValueError, match="batch_size must be even, got 33"):
        TrainConfig(cutmix_alpha=1.0, batch_size=33)


def test_batch_augment_draws_per_image_and_moves_masks_with_images():
    torch.manual_seed(0)
    cfg = OnlineAugmentConfig(hflip=True, vflip=True, rot90=True, rotate_degrees=0, scale=0, translate=0,
                              brightness=0, contrast=0)
    base = torch.zeros(64, 1, 8, 8)
    base[:, :, 1, 2] = 1.0  # one bright pixel off every symmetry axis
    images = base.repeat(1, 3, 1, 1)
    masks = base[:, 0].to(torch.uint8)
    out, out_masks = BatchAugment(cfg, torch.Generator().manual_seed(0))(images, masks)
    positions = {tuple(torch.nonzero(o[0] > 0.5)[0].tolist()) for o in out}
    assert len(positions) == 8  # all 8 dihedral images appear: drawn per image, not per batch
    assert torch.equal((out[:, 0] > 0.5).to(torch.uint8), out_masks)  # the mask follows its image exactly
    assert out_masks.dtype == torch.uint8 and set(out_masks.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("padding", ["reflection", "border", "zeros"])
def test_batch_augment_fills_what_a_rotation_brings_in_by_the_padding_mode(padding):
    """A bright image rotated by up to 30 degrees: mirrored or edge fill keeps it bright, zeros bring black corners."""
    cfg = OnlineAugmentConfig(hflip=False, rotate_degrees=30, scale=0, translate=0.1, brightness=0, contrast=0,
                              padding=padding)
    images = torch.full((16, 3, 16, 16), 0.9)
    out = BatchAugment(cfg, torch.Generator().manual_seed(0))(images)
    darkest = float(out.min())
    assert darkest < 0.1 if padding == "zeros" else darkest > 0.85


def test_unknown_padding_mode_is_refused():
    with pytest.raises(ValueError, match="padding"):
        OnlineAugmentConfig(padding="wrap")


def test_batch_augment_photometric_stays_in_range():
    cfg = OnlineAugmentConfig(hflip=False, rotate_degrees=0, scale=0, translate=0, brightness=0.5, contrast=0.5)
    x = torch.rand(16, 3, 8, 8)
    out = BatchAugment(cfg, torch.Generator().manual_seed(0))(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)


# ---------------------------------------------------------------- progressive unfreezing

def test_unfreeze_schedule():
    s = UnfreezeConfig(head_epochs=2, step_epochs=2, groups_per_step=2)
    assert [s.trainable_groups(e, 5) for e in range(8)] == [0, 0, 2, 2, 4, 4, 5, 5]


def test_unfreezing_freezes_shallow_groups_and_their_batchnorm():
    from medpipe.models.registry import get_architecture

    model = get_architecture("resnet18").build(num_classes=3, input_size=224, dropout=0.2, weights="none",
                                               head="linear")
    param_groups, before_epoch = classify.unfreezing(
        model, UnfreezeConfig(head_epochs=1, groups_per_step=2, backbone_lr_factor=0.1))
    assert param_groups[1]["lr"] == pytest.approx(0.1)
    model.train()
    before_epoch(0, model)
    groups = model.groups()
    assert not any(p.requires_grad for g in groups for p in g.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not groups[0][1].training  # frozen BatchNorm keeps its ImageNet statistics
    model.train()
    before_epoch(1, model)
    assert [any(p.requires_grad for p in g.parameters()) for g in groups] == [False, False, False, True, True]
    assert groups[-1][0].bn1.training and not groups[1][0].bn1.training


# ---------------------------------------------------------------- the train stage, end to end

TINY_MODELS = {   # a small CNN and a small U-Net, as entries of params.yaml's `models`
    "cnn_two_conv": {"arch": "cnn_two_conv", "dropout": 0.2},
    "unet": {"arch": "unet", "depth": 2, "base_width": 4, "input_size": 32, "train": {"batch_size": 8}},
}
TIMING_WORDS = ("second", "time", "duration")


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch, tmp_path):
    """No MLflow unless a test switches it on; this process's thread registration in a private folder."""
    monkeypatch.setenv("MEDPIPE_TRACKING", "off")
    monkeypatch.setenv("MEDPIPE_WORKERS_DIR", str(tmp_path / "workers"))
    monkeypatch.delenv("MEDPIPE_THREADS", raising=False)


@pytest.fixture
def data(tmp_path):
    """train / val (separable classes, each image with a square lesion and its mask) and normalization.json."""
    train_images, train_labels = easy_images(20, seed=0)
    val_images, val_labels = easy_images(8, seed=1)
    train_images, train_masks = with_lesions(train_images, seed=0)
    val_images, val_masks = with_lesions(val_images, seed=1)
    imageset(train_images, train_labels, train_masks).save(tmp_path / "train")
    imageset(val_images, val_labels, val_masks).save(tmp_path / "val")
    (tmp_path / "norm.json").write_text(json.dumps({"mode": "mean_std", "mean": [0.4] * 3, "std": [0.3] * 3}))
    return tmp_path


def train_paths(root, model: str = "cnn_two_conv", seed: int = 0) -> stage.TrainPaths:
    """The paths dvc.yaml gives the stage of ``model`` and ``seed``."""
    return stage.TrainPaths(model, seed, root / "train", root / "val", root / "norm.json",
                            root / "models" / model / f"seed{seed}", root / "plots" / model / f"seed{seed}")


def cnn_params(models: dict | None = None, **train) -> dict:
    return {"seed": 0, "seeds": [0], "dataset": "tiny", "train": fast_train(**train),
            "models": models if models is not None else {"cnn_two_conv": TINY_MODELS["cnn_two_conv"]}}


def timing_keys(value) -> list[str]:
    """Keys at any depth that look like timings."""
    if isinstance(value, dict):
        return [k for k in value if any(w in k for w in TIMING_WORDS)] + \
            [k for v in value.values() for k in timing_keys(v)]
    if isinstance(value, list):
        return [k for v in value for k in timing_keys(v)]
    return []


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_cnn_end_to_end_beats_chance(data):
    paths = train_paths(data)
    summary = stage.run(cnn_params(), paths)
    assert summary["status"] == "ok" and summary["epochs_run"] == 4 and 1 <= summary["best_epoch"] <= 4
    m = summary["validation"]
    assert m["balanced_accuracy"] > 0.8  # chance is 1/3
    assert set(m) >= {"accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "loss"}
    assert json.loads((paths.out / "validation.json").read_text()) == summary
    assert sorted(p.name for p in paths.out.iterdir()) == ["model.pt", "validation.json"]
    curves = paths.live / "plots" / "metrics"
    loss = (curves / "train" / "loss.tsv").read_text().splitlines()
    assert loss[0].split("\t") == ["step", "loss"] and [row.split("\t")[0] for row in loss[1:]] == ["1", "2", "3", "4"]
    assert (curves / "val" / "loss.tsv").is_file() and (curves / "val" / "balanced_accuracy.tsv").is_file()
    assert (curves / "lr.tsv").read_text().splitlines()[1] == "1\t0.003"
    # DVCLive's summary, a DVC metric: the best epoch and its validation metrics, not the last epoch's
    live_metrics = json.loads((paths.live / "metrics.json").read_text())
    assert live_metrics == {"best_epoch": summary["best_epoch"], "val": m, "step": 4}

    checkpoint = load_checkpoint(paths.out / "model.pt")
    assert checkpoint["epoch"] == summary["best_epoch"] and checkpoint["extra"]["seed"] == 0
    clf = TorchClassifier.load(paths.out / "model.pt")
    val = ImageSet.load(paths.val)
    proba = clf.predict_proba(val.images)
    assert proba.shape == (len(val), 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert (proba.argmax(1) == val.labels).mean() == pytest.approx(m["accuracy"], abs=1e-4)
    assert clf.class_names == CLASSES and clf.name == "cnn_two_conv" and not clf.model.training
    assert clf.preprocess(val.images[:2]).shape == (2, 3, 16, 16)
    assert isinstance(clf.gradcam_target_layers()[0], nn.Module)


@pytest.mark.parametrize("model", ["cnn_two_conv", "unet"])
def test_stage_outputs_hold_no_timings_and_a_rerun_writes_the_same_bytes(data, model):
    """model.pt, validation.json and the DVCLive files are what dvc.lock hashes: a rerun on the same
    inputs must not move them (no timings, no timestamps, no temporary names inside the files)."""
    from medpipe.segmentation import unet_stage

    run = unet_stage.run if model == "unet" else stage.run   # train_segmenter / train
    params = cnn_params(models=TINY_MODELS, epochs=2)
    paths = train_paths(data, model)
    summary = run(params, paths)
    assert summary["status"] == "ok" and summary["epochs_run"] == 2
    out, live = files(paths.out), files(paths.live)
    assert sorted(out) == ["model.pt", "validation.json"]
    written = json.loads(out["validation.json"])
    assert written == summary and timing_keys(written) == []
    monitor = "dice" if model == "unet" else "balanced_accuracy"
    assert 0.0 <= written["validation"][monitor] <= 1.0

    tsv = {name: content.decode().splitlines() for name, content in live.items() if name.endswith(".tsv")}
    assert {"plots/metrics/lr.tsv", "plots/metrics/train/loss.tsv", f"plots/metrics/val/{monitor}.tsv"} <= set(tsv)
    for name, lines in tsv.items():
        header = lines[0].split("\t")
        assert header[0] == "step" and "timestamp" not in header and len(header) == 2, (name, header)
        assert [row.split("\t")[0] for row in lines[1:]] == ["1", "2"], name
        assert timing_keys({header[1]: None}) == [], name
    if "metrics.json" in live:
        assert timing_keys(json.loads(live["metrics.json"])) == []

    run(params, paths)
    again_out, again_live = files(paths.out), files(paths.live)
    assert again_out["validation.json"] == out["validation.json"]
    assert again_out["model.pt"] == out["model.pt"], "model.pt changed on a rerun with the same inputs"
    assert again_live == live


def test_mixup_cutmix_and_weight_averaging_train_a_classifier_that_beats_chance(data):
    paths = train_paths(data)
    summary = stage.run(cnn_params(mixup_alpha=0.2, cutmix_alpha=1.0, ema_decay=0.5, epochs=6), paths)
    assert summary["status"] == "ok" and summary["validation"]["balanced_accuracy"] > 0.8   # chance: 1/3
    recipe = load_checkpoint(paths.out / "model.pt")["config"]
    assert (recipe["mixup_alpha"], recipe["cutmix_alpha"], recipe["ema_decay"]) == (0.2, 1.0, 0.5)


def test_the_seed_changes_the_model(data):
    params = cnn_params(epochs=1)
    first, second = train_paths(data, seed=0), train_paths(data, seed=1)
    stage.run(params, first)
    stage.run(params, second)
    a, b = (load_checkpoint(p.out / "model.pt") for p in (first, second))
    assert (a["extra"]["seed"], b["extra"]["seed"]) == (0, 1)
    assert not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_stage_trains_with_the_models_own_recipe(data):
    """train.epochs 1 and lr 0.004; the model overrides epochs to 2 and halves the lr with lr_factor."""
    models = {"cnn_two_conv": {**TINY_MODELS["cnn_two_conv"], "lr_factor": 0.5, "train": {"epochs": 2}}}
    paths = train_paths(data)
    summary = stage.run(cnn_params(models=models, epochs=1, lr=0.004, scheduler="none"), paths)
    assert summary["epochs_run"] == 2
    recipe = load_checkpoint(paths.out / "model.pt")["config"]
    assert recipe["epochs"] == 2 and recipe["lr"] == pytest.approx(0.002)
    assert (paths.live / "plots" / "metrics" / "lr.tsv").read_text().splitlines()[1:] == ["1\t0.002", "2\t0.002"]


@pytest.mark.parametrize(("arch", "side"), [("resnet18", 32), ("cnn_two_conv", 16)])
def test_an_unset_input_size_follows_the_data_raised_to_the_architectures_minimum(data, arch, side):
    """16-px data: a ResNet trains at its registry minimum of 32 px, a study CNN at the data's 16 px."""
    models = {arch: {"arch": arch, "input_size": None, "dropout": 0.0, "train": {"epochs": 1}}}
    paths = train_paths(data, model=arch)
    stage.run({**cnn_params(models=models), "classifiers": [arch]}, paths)
    clf = TorchClassifier.load(paths.out / "model.pt")
    assert clf.input_size == side and clf.spec["input_size"] == side
    assert clf.preprocess(ImageSet.load(paths.val).images[:1]).shape == (1, 3, side, side)


def test_training_is_deterministic(data, tmp_path):
    """Two folders, same inputs: the same validation metrics and the same weights."""
    first = train_paths(data)
    again = stage.TrainPaths(**{**first.__dict__, "out": tmp_path / "m2", "live": tmp_path / "p2"})
    a = stage.run(cnn_params(epochs=2), first)
    b = stage.run(cnn_params(epochs=2), again)
    assert a == b
    wa = load_checkpoint(first.out / "model.pt")["model"]
    wb = load_checkpoint(again.out / "model.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_mlflow_run_registers_a_model_that_loads_and_predicts(data, tmp_path, monkeypatch, caplog):
    import mlflow

    from medpipe.tracking.models import file_md5, find_model_version

    monkeypatch.setenv("MEDPIPE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    paths = train_paths(data, seed=7)
    with caplog.at_level(logging.WARNING):
        summary = stage.run(cnn_params(epochs=2), paths)
    assert sorted(p.name for p in paths.out.iterdir()) == ["model.pt", "validation.json"]  # no MLflow sidecar
    version = find_model_version(file_md5(paths.out / "model.pt"))
    assert version is not None and version.name == "medpipe-tiny-cnn_two_conv" and int(version.version) == 1
    run = mlflow.get_run(version.run_id)
    assert run.data.params["train.lr"] == "0.003" and run.data.tags["dvc_experiment"] == "exp-test"
    assert run.data.tags["seed"] == "7" and run.data.tags["model_md5"] == file_md5(paths.out / "model.pt")
    assert run.data.metrics["best_balanced_accuracy"] == pytest.approx(summary["validation"]["balanced_accuracy"],
                                                                       abs=1e-6)
    assert run.data.metrics["train_seconds"] > 0  # timings go to MLflow, never to validation.json
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(version.run_id, "val_balanced_accuracy")) == 2
    model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    assert model.metadata.signature is not None
    images = ImageSet.load(paths.val).images
    proba = np.asarray(model.predict(images))
    expected = TorchClassifier.load(paths.out / "model.pt").predict_proba(images)
    assert proba.shape == (len(images), 3) and np.allclose(proba, expected, atol=1e-5)
    # logging and loading the model print nothing a user of the pipeline cannot act on
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("mlflow")]


def test_transfer_classifier_round_trip(tmp_path):
    from medpipe.models.factory import build_classifier
    from medpipe.training.checkpoint import save_checkpoint as save

    spec = {"arch": "efficientnet_lite0", "num_classes": 3, "input_size": 32, "weights": "imagenet",
            "head": "attention", "dropout": 0.3}
    clf = TorchClassifier(build_classifier(spec), "lite", CLASSES, 32, (0.5,) * 3, (0.5,) * 3, spec)
    save(tmp_path / "lite.pt", model=clf.model, extra=clf.extra())
    loaded = TorchClassifier.load(tmp_path / "lite.pt")
    images, _ = easy_images(2, size=40)
    assert np.allclose(loaded.predict_proba(images), clf.predict_proba(images), atol=1e-6)
    assert loaded.preprocess(images).shape == (6, 3, 32, 32) and loaded.spec["head"] == "attention"


# ---------------------------------------------------------------- parameter validation

@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"lr": -1e-4}}, r"train\.lr"),
        ({"train": {"optimizer": "adagrad"}}, r"train\.optimizer"),
        ({"train": {"learning_rate": 0.1}}, r"train\.learning_rate"),
        ({"models": {"cnn_two_conv": {"arch": "vgg99"}}}, r"models\.cnn_two_conv\.arch.*unknown architecture 'vgg99'"),
        ({"models": {"other": {"arch": "cnn_two_conv"}}}, "models has no entry 'cnn_two_conv'"),
    ],
)
def test_invalid_params_fail_before_training(data, change, message):
    params = cnn_params()
    if "train" in change:
        params["train"] = {**params["train"], **change["train"]}
    else:
        params["models"] = change["models"]
    paths = train_paths(data)
    with pytest.raises(config.ParamsError, match=message):
        stage.run(params, paths)
    assert not paths.out.exists() and not paths.live.exists()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"arch": "cnn_two_conv", "train": {"epochz": 3}}, r"models\.x\.train\b.*epochz"),
        ({"arch": "cnn_two_conv", "train": {"epochs": 0}}, r"(?s)models\.x\.train\b.*epochs"),
        ({"arch": "cnn_two_conv", "weights": "imagenet"}, r"models\.x\b.*small CNN.*weights must be 'none'"),
        ({"arch": "cnn_two_conv", "head": "attention"}, r"models\.x\b.*head 'linear'"),
        ({"arch": "cnn_two_conv", "dropot": 0.1}, r"models\.x\.dropot"),
        ({"arch": "resnet101"}, r"models\.x\.arch.*unknown architecture 'resnet101'"),
        ({"arch": "resnet18", "weights": "/no/file"}, r"models\.x\.weights.*/no/file"),
    ],
)
def test_model_spec_errors_name_the_model_entry(entry, message):
    with pytest.raises(config.ParamsError, match=message):
        stage.model_spec({"train": {}, "models": {"x": entry, "y": {"arch": "cnn_two_conv"}}}, "x")


def test_model_spec_refuses_a_model_that_is_not_under_models():
    with pytest.raises(config.ParamsError, match=r"models has no entry 'nope'.*\['x'\]"):
        stage.model_spec({"models": {"x": {"arch": "cnn_two_conv"}}}, "nope")


def test_a_models_train_override_changes_that_model_only_and_lr_factor_scales_train_lr():
    params = {"train": {"lr": 0.004, "epochs": 5, "batch_size": 16}, "models": {
        "a": {"arch": "cnn_two_conv", "train": {"epochs": 2}},
        "b": {"arch": "resnet18", "lr_factor": 0.5},
        "c": {"arch": "cnn_two_conv"},
    }}
    base = config.load_section(params, "train", TrainConfig)
    a, b, c = (stage.model_spec(params, name).train_config(base) for name in "abc")
    assert (a.epochs, a.lr) == (2, 0.004) and a.model_dump(exclude={"epochs"}) == base.model_dump(exclude={"epochs"})
    assert (b.epochs, b.lr) == (5, pytest.approx(0.002))
    assert c == base and base.epochs == 5  # the shared recipe itself is untouched
    assert isinstance(stage.model_spec(params, "b"), ClassifierSpec)


def test_unavailable_imagenet_weights_stop_the_stage_before_any_training(data, monkeypatch, tmp_path):
    import socket

    from medpipe.models.efficientnet import WeightsError

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    params = cnn_params(models={"r18": {"arch": "resnet18", "weights": "imagenet"}})
    paths = train_paths(data, "r18")
    with pytest.raises(WeightsError, match="Offline, copy that file"):
        stage.run(params, paths)
    assert not paths.out.exists()


def test_splits_with_different_classes_are_refused(data):
    val = ImageSet.load(data / "val")
    ImageSet(**{**val.__dict__, "class_names": ("x", "y", "z")}).save(data / "val")
    with pytest.raises(config.ParamsError, match="different classes"):
        stage.run(cnn_params(), train_paths(data))


def test_repository_params_validate():
    from medpipe.segmentation import unet_stage
    from medpipe.segmentation.config import SegmentConfig
    from medpipe.segmentation.unet_config import UNetSpec

    params = config.load_params()
    base = config.load_section(params, "train", TrainConfig)
    for name in params["classifiers"]:
        assert isinstance(stage.model_spec(params, name), ClassifierSpec), name
    for name in params["segmenters"]:
        spec = unet_stage.model_spec(params, name)
        assert isinstance(spec, UNetSpec) and spec.train_config(base).monitor == "dice", name
    for name, entry in params["models"].items():
        (unet_stage if entry["arch"] == "unet" else stage).model_spec(params, name)
    assert config.training_seeds(params)
    config.load_section(params, "segment", SegmentConfig)
    assert isinstance(params["train"]["lr"], float)  # `dvc exp run -S train.lr=1e-4` sets an existing key
