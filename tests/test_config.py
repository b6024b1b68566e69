"""params.yaml is read strictly: a value of the wrong type or an unknown choice fails when the params load,
naming the file actually read, the key and the value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from medpipe import config
from medpipe.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def params_file(tmp_path: Path, name: str = "other.yaml", **train) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(train)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("key, value, message", [
    ("epochs", "12", "train.epochs: Input should be a valid integer"),
    ("deterministic", "yes", "train.deterministic: Input should be a valid boolean"),
    ("channels_last", 1, "train.channels_last: Input should be a valid boolean"),
    ("optimizer", "adamw2", "train.optimizer: Input should be 'adam', 'adamw' or 'sgd'"),
    ("scheduler", "linear", "train.scheduler: Input should be"),
])
def test_a_wrong_type_or_choice_fails_when_the_params_load_naming_the_file(tmp_path, key, value, message):
    path = params_file(tmp_path, **{key: value})
    params = config.load_params(path)
    with pytest.raises(config.ParamsError) as err:
        config.load_section(params, "train", TrainConfig)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value) and repr(value) in str(err.value)


@pytest.mark.parametrize("train, message", [
    ({"monitor": "balanced_acc"}, "monitor 'balanced_acc' is not a classifier's validation metric"),
    ({"monitor": "dice"}, "monitor 'dice' is not a classifier's validation metric"),
    ({"monitor": "loss", "monitor_mode": "max"}, "the loss is watched with 'min'"),
])
def test_a_classifier_monitor_is_checked_when_its_params_load(tmp_path, train, message):
    """Not after the first epoch: the stage refuses the params before any data is read."""
    from medpipe.training.runner import model_spec
    from medpipe.training.config import ClassifierSpec

    path = params_file(tmp_path, **train)
    with pytest.raises(config.ParamsError, match=rf"^{path}: models.cnn_two_conv.train: .*{message}"):
        model_spec(config.load_params(path), "cnn_two_conv", ClassifierSpec)


def test_the_loss_may_be_watched_going_down(tmp_path):
    from medpipe.training.runner import model_spec
    from medpipe.training.config import ClassifierSpec

    path = params_file(tmp_path, monitor="loss", monitor_mode="min")
    spec = model_spec(config.load_params(path), "cnn_two_conv", ClassifierSpec)
    assert spec.train_config(config.load_section(config.load_params(path), "train", TrainConfig)).monitor == "loss"


def test_numbers_as_dvc_writes_them_are_numbers(tmp_path):
    """`dvc exp run -S train.lr=1e-4` may leave `lr: 1e-4` in the file: YAML 1.1 reads that as a string."""
    path = params_file(tmp_path)
    path.write_text(path.read_text().replace("  lr: 0.001", "  lr: 1e-4"))
    assert "lr: 1e-4" in path.read_text()
    assert config.load_section(config.load_params(path), "train", TrainConfig).lr == pytest.approx(1e-4)


def test_integers_are_accepted_where_a_float_is_asked(tmp_path):
    params = config.load_params(params_file(tmp_path, lr=1, weight_decay=0))
    assert config.load_section(params, "train", TrainConfig).lr == 1.0


def test_the_repository_params_load(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    params = config.load_params(tmp_path / "params.yaml")
    config.load_section(params, "train", TrainConfig)
    assert config.source(params) == str(tmp_path / "params.yaml")


def test_errors_of_plain_values_name_the_file_read(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("seed: '42'\n")
    with pytest.raises(config.ParamsError, match=rf"^{path}: seed must be a non-negative integer"):
        config.global_seed(config.load_params(path))
