"""The ``classical`` section of params.yaml: features, models, search grid, training split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medpipe.config import Strict

FEATURES = ("raw", "hog", "histogram", "lbp", "glcm", "embedding")
MODELS = ("knn", "svm", "random_forest", "voting")
BASE_MODELS = ("knn", "svm", "random_forest")
NOT_SEARCHABLE = {"max_train_images"}  # settings of how a model is fitted, not of the model


def _check_names(values: list[str], known: tuple[str, ...], what: str) -> list[str]:
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {list(known)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{what}s listed twice: {values}")
    if not values:
        raise ValueError(f"name at least one {what} from {list(known)}")
    return values


def positive_integers(values: list[int], what: str) -> list[int]:
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must be a non-empty list of positive integers")
    return values


class RawConfig(Strict):
    size: int = Field(32, ge=4, le=256)  # downscaled side length
    grayscale: bool = True


class HogConfig(Strict):
    size: int = Field(64, ge=16, le=512)  # images are resized to size x size first
    orientations: int = Field(9, ge=2, le=36)
    pixels_per_cell: int = Field(8, ge=2, le=64)
    cells_per_block: int = Field(2, ge=1, le=8)

    @model_validator(mode="after")
    def _fits(self) -> HogConfig:
        if self.size // self.pixels_per_cell < self.cells_per_block:
            raise ValueError(
                f"hog.size {self.size} // pixels_per_cell {self.pixels_per_cell} must be at least "
                f"cells_per_block {self.cells_per_block}"
            )
        return self


class HistogramConfig(Strict):
    bins: int = Field(32, ge=2, le=256)


class LbpConfig(Strict):
    radii: list[int] = Field(default_factory=lambda: [1, 2, 3])  # one uniform-LBP histogram per radius
    points: int = Field(8, ge=4, le=32)  # sampling points per radius (x radius for larger radii)

    @field_validator("radii")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        return positive_integers(v, "radii")


class GlcmConfig(Strict):
    distances: list[int] = Field(default_factory=lambda: [1, 2, 4])
    levels: int = Field(32, ge=2, le=256)  # grey levels after quantisation

    @field_validator("distances")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        return positive_integers(v, "distances")


class EmbeddingConfig(Strict):
    size: int | None = Field(None, ge=32, le=512)  # resize before the backbone; null = keep the image size
    # with size null, smaller images are upsampled to this side: at 28 px the backbone's last feature map
    # is 1x1; at 64 px (2x2) kNN on bloodmnist gained 9 points of validation accuracy. null = never upsample
    min_size: int | None = Field(64, ge=32, le=512)
    batch_size: int = Field(64, ge=1, le=1024)


class KnnConfig(Strict):
    n_neighbors: int = Field(5, ge=1)
    weights: Literal["uniform", "distance"] = "distance"


class SvmConfig(Strict):
    C: float = Field(10.0, gt=0)
    gamma: Literal["scale", "auto"] | float = "scale"
    calibration_folds: int = Field(5, ge=2, le=20)  # Platt scaling folds for predict_proba
    # Kernel SVM fitting grows ~quadratically with the number of images (and calibration repeats it
    # calibration_folds + 1 times): above this many training images the SVM fits on a stratified,
    # seeded subset of them. null = always all images.
    max_train_images: int | None = Field(2000, ge=10)


class RandomForestConfig(Strict):
    n_estimators: int = Field(100, ge=1)
    max_depth: int | None = Field(None, ge=1)
    min_samples_leaf: int = Field(1, ge=1)
    max_features: Literal["sqrt", "log2"] | float = "sqrt"


class VotingConfig(Strict):
    weights: list[float] | None = None  # one per member, in the order knn, svm, random_forest


class SearchConfig(Strict):
    """Grid search on the training split, scored on the validation split (PredefinedSplit)."""

    enabled: bool = False
    scoring: str = "balanced_accuracy"
    knn: dict[str, list] = Field(default_factory=lambda: {"n_neighbors": [3, 5, 9, 15], "weights": ["uniform", "distance"]})
    svm: dict[str, list] = Field(default_factory=lambda: {"C": [1, 10, 100], "gamma": ["scale"]})
    random_forest: dict[str, list] = Field(default_factory=lambda: {"max_features": ["sqrt", 0.1], "min_samples_leaf": [1, 2]})

    @model_validator(mode="after")
    def _known_keys(self) -> SearchConfig:
        for name, model in (("knn", KnnConfig), ("svm", SvmConfig), ("random_forest", RandomForestConfig)):
            grid = getattr(self, name)
            known = set(model.model_fields) - NOT_SEARCHABLE
            unknown = sorted(set(grid) - known)
            if unknown:
                raise ValueError(f"search.{name}: unknown key(s) {unknown}; known: {sorted(known)}")
            for key, values in grid.items():
                if not values:
                    raise ValueError(f"search.{name}.{key}: give at least one value")
                for value in values:  # every grid value must be a valid setting
                    model.model_validate({key: value})
        return self


class ClassicalConfig(Strict):
    train_set: Literal["train", "train_augmented"] = "train"   # what the models fit on (dvc.yaml reads it too)
    features: list[str] = Field(default_factory=lambda: ["embedding", "hog", "histogram", "lbp", "glcm"])
    models: list[str] = Field(default_factory=lambda: list(MODELS))
    pca: float | int | None = None  # null: no PCA; <1: variance kept; >=1: components
    class_weight: Literal["balanced"] | None = "balanced"
    n_jobs: int = Field(2, ge=1, le=64)
    raw: RawConfig = RawConfig()
    hog: HogConfig = HogConfig()
    histogram: HistogramConfig = HistogramConfig()
    lbp: LbpConfig = LbpConfig()
    glcm: GlcmConfig = GlcmConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    knn: KnnConfig = KnnConfig()
    svm: SvmConfig = SvmConfig()
    random_forest: RandomForestConfig = RandomForestConfig()
    voting: VotingConfig = VotingConfig()
    search: SearchConfig = SearchConfig()

    @field_validator("features")
    @classmethod
    def _features(cls, v: list[str]) -> list[str]:
        return _check_names(v, FEATURES, "feature")

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        return _check_names(v, MODELS, "model")

    @field_validator("pca")
    @classmethod
    def _pca(cls, v: float | int | None) -> float | int | None:
        if v is not None and (v <= 0 or (isinstance(v, float) and 1 < v and not v.is_integer())):
            raise ValueError("pca must be null, a variance fraction in (0, 1), or a number of components >= 1")
        return v

    @model_validator(mode="after")
    def _voting(self) -> ClassicalConfig:
        members = self.voting_members
        if "voting" in self.models and len(members) < 2:
            raise ValueError(f"voting needs at least two of {list(BASE_MODELS)} in models, got {self.models}")
        if self.voting.weights is not None and len(self.voting.weights) != len(members):
            raise ValueError(f"voting.weights has {len(self.voting.weights)} entries for members {members}")
        return self

    @property
    def voting_members(self) -> list[str]:
        return [m for m in BASE_MODELS if m in self.models]
