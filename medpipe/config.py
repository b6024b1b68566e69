"""Typed, strict views of ``params.yaml``.

Each stage validates the sections it reads with a frozen pydantic model whose ``extra="forbid"``
turns a typo in a key into an error naming the key. Section models for the data stages live here;
the models of other stages live beside their logic (``medpipe.training.config``, ...) and are
read through :func:`load_section`, so there is one obvious way to read any parameter.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medpipe.errors import UserError

PARAMS_FILE = "params.yaml"
SECTIONS = (
    "seed", "seeds", "dataset", "image_size", "download", "preprocess", "split", "augment",
    "cv", "train", "classifiers", "segmenters", "models", "classical", "segment", "evaluate", "review",
)


class ParamsError(UserError, ValueError):
    """params.yaml is missing a key, has an unknown key, or holds a wrong value."""


class Params(dict):
    """The parsed params file, remembering which file it is, so that every error names the file actually read."""

    def __init__(self, values: dict, path: Path) -> None:
        super().__init__(values)
        self.path = path


def source(params: dict) -> str:
    """The params file ``params`` came from (``params.yaml`` for a plain dict)."""
    return str(getattr(params, "path", PARAMS_FILE))


# the classification metrics a model can be chosen by (medpipe.metrics.classification_metrics computes them)
ValidationMetric = Literal["accuracy", "balanced_accuracy", "f1_macro", "roc_auc"]


class Strict(BaseModel):
    # strict: "12" is not 12, "yes" and 1 are not true; a YAML value of the wrong type is an error, not a guess
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def __getstate__(self) -> dict:
        """Pickle the set of fields given as a sorted list: a set of strings pickles in hash order, which changes
        from process to process, and a saved model holding a config would change bytes (and DVC hash) on rerun."""
        state = super().__getstate__()
        state["__pydantic_fields_set__"] = sorted(state["__pydantic_fields_set__"])
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**state, "__pydantic_fields_set__": set(state["__pydantic_fields_set__"])})


class DownloadConfig(Strict):
    timeout_s: float = Field(60.0, gt=0)
    # where a dataset's public source (a GitHub repository at a commit) is fetched from
    archive_url: str = Field("https://github.com/{repo}/archive/{commit}.zip", pattern=r"\{repo\}.*\{commit\}")
    file_url: str = Field("https://raw.githubusercontent.com/{repo}/{commit}/{path}",
                          pattern=r"\{repo\}.*\{commit\}.*\{path\}")


class PreprocessConfig(Strict):
    workers: int = Field(2, ge=1, le=64)
    crop: Literal["auto", "brain_contour", "scan_area", "none"] = "auto"
    # larger images are skipped as too_large from their header, before decoding (decompression bombs);
    # the default is PIL's own Image.MAX_IMAGE_PIXELS (1 GiB / 4 B / 3: about 9459 x 9459 px)
    max_pixels: int = Field(89_478_485, gt=0)


class SplitConfig(Strict):
    train: float = Field(0.70, gt=0, lt=1)
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    seed: int = 42
    near_duplicate_distance: int = Field(4, ge=-1, le=64)
    conflicting_labels: Literal["drop", "keep"] = "drop"
    # false: the pipeline's own split; true: the source's train/val/test, duplicates of a test image moved to test
    # (leak-free for sources whose folders leak); exact: the source's split untouched, as a benchmark scores it
    use_source_split: bool | Literal["exact"] = False
    normalization: Literal["mean_std", "unit"] = "mean_std"

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"split.train + split.val + split.test must sum to 1, got "
                f"{self.train} + {self.val} + {self.test} = {total:.6g}"
            )
        return self


class CVConfig(Strict):
    """``cv``: k-fold cross-validation of the non-test images; ``folds: []`` is the hold-out split alone.

    ``folds`` lists the fold numbers 0..k-1 (DVC's ``matrix`` builds one training stage per entry, so the
    count is written as the list: ``-S 'cv.folds=[0,1,2,3,4]'`` for 5 folds).
    """

    folds: list[int] = Field(default_factory=list)
    inner_val: float = Field(0.15, gt=0, lt=0.5)   # share of each fold's training images kept for early stopping

    @model_validator(mode="after")
    def _numbered(self) -> CVConfig:
        if self.folds and (len(self.folds) < 2 or self.folds != list(range(len(self.folds)))):
            raise ValueError(f"cv.folds must be [] (hold-out only) or the fold numbers 0..k-1 with k >= 2, e.g. "
                             f"[0, 1, 2, 3, 4] for 5 folds, got {self.folds}")
        return self

    @property
    def k(self) -> int:
        """The number of folds (0: hold-out only)."""
        return len(self.folds)


class AugmentConfig(Strict):
    balance: Literal["oversample", "none"] = "oversample"
    target: Literal["majority"] | int = "majority"
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    transpose: bool = True
    rotate_degrees: float = Field(10.0, ge=0, le=180)
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.1, ge=0, le=1)


S = TypeVar("S", bound=BaseModel)


class _Yaml12Floats(yaml.SafeLoader):
    """YAML 1.2 floats: ``1e-4`` is a number (PyYAML's YAML 1.1 reads it as a string), as DVC writes it for
    ``dvc exp run -S train.lr=1e-4``."""


_Yaml12Floats.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} does not exist (run from the repository root)")
    try:
        params = yaml.load(path.read_text(), Loader=_Yaml12Floats) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: unknown top-level key(s) {unknown}; known: {list(SECTIONS)}")
    return Params(params, path)


def load_section(params: dict, name: str, model: type[S]) -> S:
    """Validate ``params[name]`` against ``model``; errors name the key path and the bad value."""
    raw = params.get(name)
    if raw is None:
        raw = {}
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            if e["loc"] else f"{name}: {e['msg']}"
            for e in err.errors()
        )
        raise ParamsError(f"{source(params)}: {problems}") from None


def dataset_name(params: dict) -> str:
    name = params.get("dataset")
    if not isinstance(name, str) or not name:
        raise ParamsError(f"{source(params)}: 'dataset' must name an entry of datasets.yaml")
    return name


def image_size(params: dict, default: int) -> int:
    """``image_size`` from params.yaml, or the dataset's default when it says ``auto``."""
    value = params.get("image_size", "auto")
    if value == "auto":
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= 1024:
        raise ParamsError(f"{source(params)}: image_size must be 'auto' or an integer in 8..1024, got {value!r}")
    return value


def global_seed(params: dict) -> int:
    seed = params.get("seed", 42)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParamsError(f"{source(params)}: seed must be a non-negative integer, got {seed!r}")
    return seed


def training_seeds(params: dict) -> list[int]:
    """``seeds``: the training seeds of the deep models (each model trains once per seed)."""
    seeds = params.get("seeds", [global_seed(params)])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ParamsError(f"{source(params)}: seeds must be a non-empty list of distinct non-negative integers, got {seeds!r}")
    return seeds


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed random, numpy and torch; ask torch for deterministic algorithms."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
