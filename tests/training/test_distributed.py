"""Data-parallel training (``train.processes > 1``): the sharded batches, DDP in the loop (all-reduced
training metrics, one validation, progressive unfreezing), and the real ``train`` stage command run in
two gloo processes on CPU, whose outputs must be those of a single process, written by rank 0 alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from medpipe import config
from medpipe.predictors import load_any
from medpipe.training import stage
from medpipe.training.distributed import LaunchError
from medpipe.training.checkpoint import load_checkpoint
from medpipe.training.config import TrainConfig
from medpipe.training.data import ArrayBatches
from test_training import TINY_MODELS, easy_images, fast_train, imageset

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- sharded batches

def shards(world_size: int, n: int = 23, **kwargs) -> list[ArrayBatches]:
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(3, axis=3)
    return [ArrayBatches(images, np.arange(n), batch_size=4, shuffle=True, drop_last=True, seed=7, rank=rank,
                         world_size=world_size, **kwargs) for rank in range(world_size)]


def epoch_indices(batches: ArrayBatches) -> list[int]:
    """The image indices one epoch yields (image i holds the value i)."""
    return [int(v) for x, _ in batches for v in x[:, 0, 0, 0].mul(255).round()]


def test_each_rank_gets_a_disjoint_seeded_shard_of_every_epoch():
    """23 images, 3 ranks: each epoch one permutation from the shared seed, every third index from each
    rank's position (7 each, disjoint; the 2 left over dropped), then drop_last per rank: one batch of 4."""
    ranks = shards(3)
    assert [len(b) for b in ranks] == [1, 1, 1]
    reference = torch.Generator().manual_seed(7)
    epochs = []
    for _ in range(3):
        permutation = torch.randperm(23, generator=reference).tolist()
        epochs.append([epoch_indices(b) for b in ranks])
        assert epochs[-1] == [permutation[r:21:3][:4] for r in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]   # reshuffled every epoch


def test_one_process_batches_are_unchanged():
    """rank 0 of 1 gives exactly the batches of before (order and augmentation share the one generator)."""
    augment = {"augment": TrainConfig().augment}
    (one,) = shards(1, **augment)
    images = np.arange(23, dtype=np.uint8)[:, None, None, None].repeat(3, axis=3)
    plain = ArrayBatches(images, np.arange(23), batch_size=4, shuffle=True, drop_last=True, seed=7, **augment)
    assert len(one) == len(plain) == 5 and one.augment.generator is one.generator
    for _ in range(2):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, plain, strict=True))


def test_ranks_draw_their_own_augmentation_and_a_bad_rank_is_refused():
    a, b = shards(2, augment=TrainConfig().augment)
    assert a.augment.generator is not a.generator and a.augment.generator is not b.augment.generator
    assert a.order().tolist() != b.order().tolist()
    with pytest.raises(ValueError, match="rank 2"):
        ArrayBatches(np.zeros((4, 2, 2, 3), np.uint8), np.zeros(4), batch_size=2, rank=2, world_size=2)


# ---------------------------------------------------------------- the loop under DDP (two gloo processes)

class Toy(nn.Module):
    """A 'backbone' group and a head, like the transfer models' ``groups()``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))

    def groups(self):
        return [self.body]


class Spare(Toy):
    """A layer that forward never uses (like the encoder blocks below a shallow U-Net's depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(2, 2)


def _ddp_worker(rank: int, world_size: int, folder: str) -> None:
    from medpipe.training.loop import fit

    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                                         world_size=world_size)
    torch.set_num_threads(1)
    torch.manual_seed(rank)   # different initial weights: DDP must broadcast rank 0's
    model = Toy()
    for p in model.body.parameters():   # frozen when DDP wraps it, unfrozen later: its gradients must be averaged
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    mine = [(x[i:i + 8], y[i:i + 8]) for i in range(rank * 8, 64, 8 * world_size)]   # this rank's shard
    snapshots = []

    def before_epoch(epoch, module):   # epoch 0 trains the head alone, then everything (progressive unfreezing)
        snapshots.append(module.body[0].weight.detach().clone())
        for p in module.body.parameters():
            p.requires_grad_(epoch > 0)

    cfg = TrainConfig(epochs=3, lr=0.05, monitor="acc", precision="fp32", channels_last=False, scheduler="none",
                      device="cpu")
    records = []
    result = fit(model, mine, nn.functional.cross_entropy,
                 lambda m: {"acc": float((m(x).argmax(1) == y).float().mean()), "rank": float(rank)}, cfg,
                 before_epoch=before_epoch, on_epoch=records.append, checkpoint_path=Path(folder) / f"m{rank}.pt",
                 restore_best=False)
    torch.manual_seed(rank)
    spare = Spare()
    fit(spare, mine, nn.functional.cross_entropy, lambda m: {"acc": 1.0}, cfg.updated(epochs=2))
    torch.save({"state": model.state_dict(), "history": result.history, "records": records,
                "snapshots": snapshots, "spare": spare.state_dict()}, Path(folder) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_fit_under_ddp_keeps_ranks_in_step_through_unfreezing_and_unused_parameters(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for key in r0["state"]:   # the same weights on both ranks at the end: every gradient was averaged
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    for key in r0["spare"]:   # an unused parameter does not stop DDP (static graph), and the rest stays in step
        assert torch.equal(r0["spare"][key], r1["spare"][key]), key
    s0 = r0["snapshots"]
    assert torch.equal(s0[0], s0[1]), "a frozen layer changed"
    assert not torch.equal(s0[1], s0[2]) and not torch.equal(s0[2], r0["state"]["body.0.weight"])
    h0, h1 = r0["history"], r1["history"]
    for a, b in zip(h0, h1, strict=True):   # all-reduced training stats, rank 0's validation everywhere
        assert a["train_loss"] == b["train_loss"] and a["val_acc"] == b["val_acc"] and a["val_rank"] == 0.0
    assert len(r0["records"]) == 3 and r1["records"] == []   # on_epoch and the checkpoint: rank 0 only
    assert (tmp_path / "m0.pt").is_file() and not (tmp_path / "m1.pt").exists()
    assert set(load_checkpoint(tmp_path / "m0.pt")["model"]) == set(r0["state"])   # no "module." prefix
    assert load_checkpoint(tmp_path / "m0.pt")["config"]["processes"] == 2


# ---------------------------------------------------------------- the stage command in two processes

def test_processes_is_validated_and_one_process_checkpoints_omit_it():
    from medpipe.training.loop import checkpoint_config

    with pytest.raises(ValueError, match="processes"):
        TrainConfig(processes=0)
    assert "processes" not in checkpoint_config(TrainConfig(), 1)
    assert TrainConfig.model_validate(config.load_params(ROOT / "params.yaml")["train"]).processes == 1


def test_several_processes_need_the_stage_command(tmp_path, monkeypatch):
    """Called from Python (here: pytest), the stage cannot run its own command again: a clear error, no output."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    paths = stage.TrainPaths("cnn_two_conv", 0, tmp_path / "t", tmp_path / "v", tmp_path / "n.json",
                             tmp_path / "out", tmp_path / "live")
    params = {"seed": 0, "seeds": [0], "dataset": "tiny", "train": fast_train(processes=2, device="cpu"),
              "models": {"cnn_two_conv": TINY_MODELS["cnn_two_conv"]}}
    with pytest.raises(LaunchError, match="python -m stages.train"):
        stage.run(params, paths)
    assert list(tmp_path.iterdir()) == []


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_the_train_stage_in_two_processes_learns_and_writes_what_one_process_writes(tmp_path, monkeypatch):
    for name, value in {"MEDPIPE_TRACKING": "off", "MEDPIPE_THREADS": "1",
                        "MEDPIPE_WORKERS_DIR": str(tmp_path / "workers")}.items():
        monkeypatch.setenv(name, value)
    data = tmp_path / "data"
    data.mkdir()
    train_images, train_labels = easy_images(24, seed=0)
    val_images, val_labels = easy_images(8, seed=1)
    imageset(train_images, train_labels).save(data / "train")
    imageset(val_images, val_labels).save(data / "val")
    (data / "norm.json").write_text(json.dumps({"mode": "mean_std", "mean": [0.4] * 3, "std": [0.3] * 3}))
    recipe = fast_train(processes=2, device="cpu", epochs=4, batch_size=8)   # gloo on CPU, even beside a GPU
    params = {"seed": 0, "seeds": [0], "dataset": "tiny", "train": recipe,
              "models": {"cnn_two_conv": TINY_MODELS["cnn_two_conv"]}}
    (data / "params.yaml").write_text(yaml.safe_dump(params))
    inputs, repo_before = tree(data), set(os.listdir(ROOT))
    out, live = data / "models" / "cnn_two_conv" / "seed0", data / "plots" / "cnn_two_conv" / "seed0"
    env = dict(os.environ)
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "stages.train", "--params", str(data / "params.yaml"), "--model",
               "cnn_two_conv", "--seed", "0", "--train", str(data / "train"), "--val", str(data / "val"),
               "--normalization", str(data / "norm.json"), "--out", str(out), "--live", str(live)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr and "1 threads x 2 processes" in done.stderr
    workers = tmp_path / "workers"   # both ranks registered for their share of the cores, and left
    assert workers.is_dir() and list(workers.glob("*.pid")) == []

    summary = json.loads((out / "validation.json").read_text())
    assert summary["status"] == "ok" and summary["epochs_run"] == 4
    assert summary["validation"]["balanced_accuracy"] > 0.8   # chance is 1/3
    clf = load_any(out / "model.pt")
    proba = clf.predict_proba(val_images)
    assert (proba.argmax(1) == val_labels).mean() == pytest.approx(summary["validation"]["accuracy"], abs=1e-4)
    checkpoint = load_checkpoint(out / "model.pt")
    assert checkpoint["config"]["processes"] == 2 and checkpoint["epoch"] == summary["best_epoch"]
    loss = (live / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in loss[1:]] == ["1", "2", "3", "4"]

    # exactly the files one process writes, once: nothing from rank 1, no temporary folder left behind
    single = stage.TrainPaths("cnn_two_conv", 0, data / "train", data / "val", data / "norm.json",
                              tmp_path / "single" / "out", tmp_path / "single" / "live")
    stage.run({**params, "train": {**params["train"], "processes": 1, "epochs": 1}}, single)
    assert tree(out) == tree(single.out) == {"model.pt", "validation.json"}
    assert tree(live) == tree(single.live)
    folders = {"models", "models/cnn_two_conv", "models/cnn_two_conv/seed0", "plots", "plots/cnn_two_conv",
               "plots/cnn_two_conv/seed0"}
    assert tree(data) - inputs == folders | {f"models/cnn_two_conv/seed0/{p}" for p in tree(out)} \
        | {f"plots/cnn_two_conv/seed0/{p}" for p in tree(live)}
    assert set(os.listdir(ROOT)) == repo_before   # no mlflow.db, DVCLive folder or log in the repository
