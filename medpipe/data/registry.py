"""The dataset registry (``datasets.yaml``): which file a dataset comes from and how to read it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medpipe.config import ValidationMetric
from medpipe.errors import UserError
from medpipe.paths import repo_root

REGISTRY_FILE = "datasets.yaml"


class RegistryError(UserError, ValueError):
    """The registry file, or the dataset name asked for, is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CopyRecipe(_Strict):
    """Each source file becomes the manifest's member of a zip, bytes unchanged."""

    kind: Literal["copy"] = "copy"


class GreyThumbnailRecipe(_Strict):
    """Each source image becomes 8-bit grey, at most ``max_side`` px a side, JPEG of ``quality``."""

    kind: Literal["grey_thumbnail_jpeg"]
    max_side: int = Field(256, ge=8)
    quality: int = Field(95, ge=1, le=100)


class MedmnistRecipe(_Strict):
    """The MedMNIST recipe: centre crop, bicubic resize, a seeded split of the given sizes, one ``.npz``."""

    kind: Literal["medmnist_npz"]
    folders: tuple[str, ...] = Field(min_length=2)  # the source's class folders, in label order
    crop: int = Field(ge=1)
    size: int = Field(ge=1)
    seed: int
    train: int = Field(ge=1)
    val: int = Field(ge=0)
    content_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the arrays (medpipe.data.sources.arrays_digest)


Recipe = Annotated[CopyRecipe | GreyThumbnailRecipe | MedmnistRecipe, Field(discriminator="kind")]


class PublicSource(_Strict):
    """A public GitHub repository at a pinned commit that the dataset file is built from."""

    repo: str = Field(pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")  # owner/name
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    fetch: Literal["files", "archive"] = "files"  # file by file, or the repository archive at the commit
    manifest: str                                 # committed list of the files used, with their sha256
    recipe: Recipe = CopyRecipe()
    extra_members: dict[str, str] = Field(default_factory=dict)  # member of the dataset file -> project file

    @property
    def name(self) -> str:
        return self.repo.split("/", 1)[1]


class SourceFile(_Strict):
    name: str
    checksum: str  # of the ready-made file (an offline copy, or the download from ``urls``)
    urls: tuple[str, ...] = ()
    source: PublicSource | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if Path(value).name != value or value.startswith("."):
            raise ValueError(f"file name {value!r} must be a plain file name, not a path")
        return value

    @field_validator("checksum")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        algo, _, digest = value.partition(":")
        lengths = {"sha256": 64, "md5": 32}
        if algo not in lengths or len(digest) != lengths[algo] or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"checksum {value!r} must be 'sha256:<64 hex>' or 'md5:<32 hex>'")
        return value

    @property
    def algorithm(self) -> str:
        return self.checksum.split(":", 1)[0]

    @property
    def digest(self) -> str:
        return self.checksum.split(":", 1)[1]


class Metadata(_Strict):
    path: str
    id_column: str
    group_column: str


class Component(_Strict):
    dataset: str
    classes: dict[str, str]


class DatasetSpec(_Strict):
    name: str
    description: str = ""
    reader: Literal["class_folders", "medmnist_npz", "compose"]
    files: tuple[SourceFile, ...] = ()
    # class name -> folder name (class_folders) or label index (medmnist_npz) or class name (compose)
    classes: dict[str, str | int]
    mask_suffix: str | None = None
    split_folders: dict[str, Literal["train", "val", "test"]] = Field(default_factory=dict)
    metadata: Metadata | None = None
    compose: tuple[Component, ...] = ()
    crop: Literal["brain_contour", "scan_area", "none"] = "none"
    image_size: int = Field(128, ge=8, le=1024)
    # the metric the dataset's published benchmark ranks by: what `evaluate.champion_metric: auto` chooses with
    benchmark_metric: ValidationMetric | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        if self.reader == "compose":
            if not self.compose:
                raise ValueError("reader 'compose' needs a 'compose' list")
            produced = [new for part in self.compose for new in part.classes.values()]
            if sorted(produced) != sorted(self.classes):
                raise ValueError(f"'compose' produces classes {produced}, 'classes' lists {list(self.classes)}")
        elif not self.files:
            raise ValueError(f"reader {self.reader!r} needs at least one entry under 'files'")
        if len(self.classes) < 2:
            raise ValueError("a dataset needs at least two classes")
        return self

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def has_masks(self) -> bool:
        return self.mask_suffix is not None


def load_registry(path: str | Path | None = None) -> dict[str, DatasetSpec]:
    path = Path(path) if path is not None else repo_root() / REGISTRY_FILE
    if not path.is_file():
        raise RegistryError(f"dataset registry {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: expected a mapping of dataset name -> entry")
    specs: dict[str, DatasetSpec] = {}
    for name, entry in raw.items():
        try:
            specs[name] = DatasetSpec(name=name, **(entry or {}))
        except ValidationError as err:
            raise RegistryError(f"{path}: entry {name!r} is invalid:\n{err}") from None
        except TypeError as err:
            raise RegistryError(f"{path}: entry {name!r} is invalid: {err}") from None
    for spec in specs.values():
        for part in spec.compose:
            if part.dataset not in specs or specs[part.dataset].reader == "compose":
                raise RegistryError(f"{path}: entry {spec.name!r} composes unknown dataset {part.dataset!r}")
            unknown = set(part.classes) - set(specs[part.dataset].classes)
            if unknown:
                raise RegistryError(
                    f"{path}: entry {spec.name!r} takes classes {sorted(unknown)} that {part.dataset!r} lacks"
                )
    return specs


def get_spec(name: str, path: str | Path | None = None) -> DatasetSpec:
    specs = load_registry(path)
    if name not in specs:
        raise RegistryError(f"unknown dataset {name!r} (params.yaml key 'dataset'); registered: {sorted(specs)}")
    return specs[name]


def source_files(spec: DatasetSpec, path: str | Path | None = None) -> list[SourceFile]:
    """Every file a dataset needs, components' files included for composed datasets."""
    if spec.reader != "compose":
        return list(spec.files)
    specs = load_registry(path)
    return [f for part in spec.compose for f in specs[part.dataset].files]
