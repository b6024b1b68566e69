"""The generic training loop, batches, online augmentation, checkpoints, class imbalance, the
classification stages end to end (with MLflow against a temporary store) and parameter validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from medpipe import config
from medpipe.imageset import ImageSet
from medpipe.training import classify
from medpipe.training.augment import BatchAugment
from medpipe.training.checkpoint import load_checkpoint, resume, save_checkpoint
from medpipe.training.config import (
    CNNStageConfig, OnlineAugmentConfig, ResNetStageConfig, TrainConfig, UnfreezeConfig,
)
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


def imageset(images: np.ndarray, labels: np.ndarray) -> ImageSet:
    n = len(labels)
    ids = np.array([f"img{i}" for i in range(n)])
    return ImageSet(images=images, labels=labels, class_names=CLASSES, source_ids=ids, groups=np.array([""] * n),
                    content_hashes=ids, phashes=np.arange(n, dtype=np.uint64), source_splits=np.array([""] * n))


def fast_train(**changes) -> dict:
    base = dict(lr=3e-3, epochs=4, batch_size=16, precision="fp32", channels_last=False, patience=10,
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
    from medpipe.models.resnet import build_transfer

    model = build_transfer("resnet18", 3, "none")
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


# ---------------------------------------------------------------- end to end

@pytest.fixture
def splits(tmp_path):
    train_images, train_labels = easy_images(20, seed=0)
    val_images, val_labels = easy_images(8, seed=1)
    imageset(train_images, train_labels).save(tmp_path / "train.npz")
    imageset(val_images, val_labels).save(tmp_path / "val.npz")
    (tmp_path / "norm.json").write_text(json.dumps({"mode": "mean_std", "mean": [0.4] * 3, "std": [0.3] * 3}))
    return classify.StagePaths(tmp_path / "train.npz", tmp_path / "val.npz", tmp_path / "norm.json",
                               tmp_path / "models", tmp_path / "metrics.json", tmp_path / "plots")


def cnn_params(**train) -> dict:
    return {"seed": 0, "dataset": "tiny", "train": fast_train(**train),
            "cnn": {"train": ["cnn_two_conv"], "models": {"cnn_two_conv": {"arch": "cnn_two_conv", "dropout": 0.2}}}}


def test_train_cnn_end_to_end_beats_chance(splits):
    metrics = classify.run_stage(cnn_params(), "train_cnn", splits, log_mlflow=False)
    m = metrics["cnn_two_conv"]
    assert m["balanced_accuracy"] > 0.8  # chance is 1/3
    assert set(m) >= {"accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "best_epoch", "train_seconds",
                      "images_per_second"}
    assert json.loads(splits.metrics.read_text()) == metrics
    loss = (splits.plots / "curves" / "cnn_two_conv" / "loss.csv").read_text().splitlines()
    assert loss[0] == "epoch,train,val" and len(loss) == 5
    assert (splits.plots / "lr" / "cnn_two_conv.csv").is_file()

    clf = TorchClassifier.load(splits.models / "cnn_two_conv.pt")
    val = ImageSet.load(splits.val)
    proba = clf.predict_proba(val.images)
    assert proba.shape == (len(val), 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert (proba.argmax(1) == val.labels).mean() == pytest.approx(m["accuracy"], abs=1e-4)
    assert clf.class_names == CLASSES and clf.name == "cnn_two_conv" and not clf.model.training
    assert clf.preprocess(val.images[:2]).shape == (2, 3, 16, 16)
    assert isinstance(clf.gradcam_target_layers()[0], nn.Module)


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


def test_training_is_deterministic(splits, tmp_path):
    first = classify.run_stage(cnn_params(epochs=2), "train_cnn", splits, log_mlflow=False)
    again = classify.StagePaths(**{**splits.__dict__, "models": tmp_path / "m2", "metrics": tmp_path / "m2.json"})
    second = classify.run_stage(cnn_params(epochs=2), "train_cnn", again, log_mlflow=False)
    strip = lambda m: {k: v for k, v in m["cnn_two_conv"].items() if k not in ("train_seconds", "images_per_second")}  # noqa: E731
    assert strip(first) == strip(second)
    a = load_checkpoint(splits.models / "cnn_two_conv.pt")["model"]
    b = load_checkpoint(tmp_path / "m2" / "cnn_two_conv.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mlflow_run_registers_a_model_that_loads_and_predicts(splits, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    classify.run_stage(cnn_params(epochs=2), "train_cnn", splits, log_mlflow=True)
    sidecar = json.loads((splits.models / "cnn_two_conv.mlflow.json").read_text())
    assert sidecar["registered_model"] == "medpipe-tiny-cnn_two_conv" and sidecar["version"] == 1
    run = mlflow.get_run(sidecar["run_id"])
    assert run.data.params["train.lr"] == "0.003" and run.data.tags["dvc_experiment"] == "exp-test"
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(sidecar["run_id"], "val_balanced_accuracy")) == 2
    model = mlflow.pyfunc.load_model(sidecar["model_uri"])
    assert model.metadata.signature is not None
    images = ImageSet.load(splits.val).images
    proba = np.asarray(model.predict(images))
    expected = TorchClassifier.load(splits.models / "cnn_two_conv.pt").predict_proba(images)
    assert proba.shape == (len(images), 3) and np.allclose(proba, expected, atol=1e-5)


# ---------------------------------------------------------------- parameter validation

@pytest.mark.parametrize(
    ("section", "change", "message"),
    [
        ("train", {"lr": -1e-4}, "train.lr"),
        ("train", {"optimizer": "adagrad"}, "train.optimizer"),
        ("train", {"learning_rate": 0.1}, "train.learning_rate"),
        ("cnn", {"models": {"cnn_two_conv": {"arch": "vgg99"}}}, "unknown CNN architecture 'vgg99'"),
        ("cnn", {"train": ["nope"]}, "not under models"),
    ],
)
def test_invalid_params_fail_before_training(splits, section, change, message):
    params = cnn_params()
    params[section] = {**params[section], **change}
    with pytest.raises(config.ParamsError, match=message):
        classify.run_stage(params, "train_cnn", splits, log_mlflow=False)
    assert not splits.models.exists()


def test_resnet_section_rejects_unknown_arch_and_missing_weights_file():
    with pytest.raises(config.ParamsError, match="unknown architecture 'resnet101'"):
        config.load_section({"resnet": {"train": ["r"], "models": {"r": {"arch": "resnet101"}}}}, "resnet",
                            ResNetStageConfig)
    params = {"train": {}, "resnet": {"train": ["r"], "models": {"r": {"arch": "resnet18", "weights": "/no/file"}}}}
    with pytest.raises(config.ParamsError, match="resnet.models.r.weights"):
        classify.load_stage_config(params, "train_resnet")


def test_repository_params_validate():
    params = config.load_params()
    for stage in classify.STAGES:
        base, section = classify.load_stage_config(params, stage)
        assert section.selected()
    assert isinstance(params["train"]["lr"], float)  # `dvc exp run -S train.lr=1e-4` sets an existing key
    assert CNNStageConfig().train == ["cnn_two_conv"] and not math.isnan(base.lr)


def test_unavailable_imagenet_weights_stop_the_stage_before_any_training(splits, monkeypatch, tmp_path):
    import socket

    from medpipe.models.efficientnet import WeightsError

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    params = {"seed": 0, "dataset": "tiny", "train": fast_train(),
              "resnet": {"train": ["scratch", "r18"], "models": {
                  "scratch": {"arch": "resnet18", "weights": "none"},
                  "r18": {"arch": "resnet18", "weights": "imagenet"}}}}
    with pytest.raises(WeightsError, match="Offline, copy that file"):
        classify.run_stage(params, "train_resnet", splits, log_mlflow=False)
    assert not splits.models.exists()  # the first model was not trained either
