"""kNN, RBF SVM, random forest and their soft-voting ensemble on shared image features.

Training extracts the features of the training and validation images once, fits a small
``scaling -> optional PCA -> classifier`` head per model on them, and saves each model as an
:class:`ImageClassifier`: a scikit-learn ``Pipeline`` whose first step is the fitted feature
extractor, so ``predict_proba`` takes uint8 images (N, H, W, 3) like every other medpipe model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier, VotingClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from medpipe.errors import UserError
from medpipe.classical.config import MODELS, ClassicalConfig
from medpipe.classical.features import feature_blocks, make_features
from medpipe.metrics import classification_metrics

log = logging.getLogger(__name__)


class UnknownModelError(UserError, ValueError):
    """A model name that no classifier implements."""


class ImageClassifier(Pipeline):
    """A fitted ``Pipeline`` (features -> scaling -> [PCA] -> classifier) that knows its class names."""

    def __init__(self, steps, *, class_names: tuple[str, ...] = (), transform_input=None, memory=None,
                 verbose=False):
        super().__init__(steps, transform_input=transform_input, memory=memory, verbose=verbose)
        self.class_names = class_names

    def predict_proba(self, X, **params) -> np.ndarray:
        """Class probabilities (N, len(class_names)) of uint8 images (N, H, W, 3)."""
        proba = super().predict_proba(X, **params)
        return _full_proba(proba, self.classes_, len(self.class_names))


def classifier(name: str, cfg: ClassicalConfig, seed: int):
    """The bare estimator for ``name`` with the settings of params.yaml."""
    if name == "knn":
        return KNeighborsClassifier(n_neighbors=cfg.knn.n_neighbors, weights=cfg.knn.weights,
                                    metric="euclidean", n_jobs=cfg.n_jobs)
    if name == "svm":
        svc = SVC(kernel="rbf", C=cfg.svm.C, gamma=cfg.svm.gamma, class_weight=cfg.class_weight,
                  random_state=seed)
        # Platt scaling fitted out of fold (what SVC(probability=True) did before scikit-learn 1.9)
        return CalibratedClassifierCV(svc, method="sigmoid", cv=cfg.svm.calibration_folds, ensemble=False,
                                      n_jobs=cfg.n_jobs)
    if name == "random_forest":
        return RandomForestClassifier(
            n_estimators=cfg.random_forest.n_estimators, max_depth=cfg.random_forest.max_depth,
            min_samples_leaf=cfg.random_forest.min_samples_leaf, max_features=cfg.random_forest.max_features,
            class_weight=cfg.class_weight, n_jobs=cfg.n_jobs, random_state=seed,
        )
    raise UnknownModelError(f"unknown model {name!r}; choose from {list(MODELS)}")


def head(name: str, cfg: ClassicalConfig, seed: int) -> Pipeline:
    """Scaling, optional PCA and the classifier, fitted on extracted features."""
    steps = [("scale", StandardScaler())]
    if cfg.pca is not None:
        steps.append(("pca", PCA(n_components=cfg.pca, random_state=seed)))
    steps.append(("clf", classifier(name, cfg, seed)))
    return Pipeline(steps)


# grid keys in params (``search.<model>.<key>``) -> parameter names of the head pipeline
_GRID_PARAMS = {
    "knn": {"n_neighbors": "clf__n_neighbors", "weights": "clf__weights"},
    "svm": {"C": "clf__estimator__C", "gamma": "clf__estimator__gamma",
            "calibration_folds": "clf__cv"},
    "random_forest": {k: f"clf__{k}" for k in ("n_estimators", "max_depth", "min_samples_leaf", "max_features")},
}


def search(name: str, pipe: Pipeline, cfg: ClassicalConfig, x_train, y_train, x_val, y_val) -> tuple[dict, float]:
    """Grid search fitted on the training split and scored on the validation split.

    Returns the best settings (as params keys) and their validation score; the caller refits on
    the training split only, so validation images never enter the saved model.
    """
    grid = {_GRID_PARAMS[name][k]: v for k, v in getattr(cfg.search, name).items()}
    fold = np.concatenate([np.full(len(y_train), -1), np.zeros(len(y_val), dtype=int)])
    gs = GridSearchCV(pipe, grid, scoring=cfg.search.scoring, cv=PredefinedSplit(fold), refit=False,
                      n_jobs=cfg.n_jobs, error_score="raise")
    gs.fit(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]))
    back = {v: k for k, v in _GRID_PARAMS[name].items()}
    best = {back[k]: v for k, v in gs.best_params_.items()}
    return best, float(gs.best_score_)


def fit_subset(labels: np.ndarray, max_images: int | None, seed: int) -> np.ndarray | None:
    """Indices of a stratified, seeded subset of at most ``max_images`` images (sorted), or None for all.

    Class proportions are kept (every class present keeps at least one image), and the same labels,
    cap and seed always give the same subset.
    """
    labels = np.asarray(labels)
    if max_images is None or len(labels) <= max_images:
        return None
    classes, counts = np.unique(labels, return_counts=True)
    if max_images < len(classes):
        raise ValueError(f"max_train_images {max_images} is below the number of classes {len(classes)}")
    # in proportion to the class sizes (largest remainders), but at least one image per class
    share = max_images * counts / counts.sum()
    take = np.maximum(np.floor(share), 1).astype(int)
    for i in np.argsort(-(share - np.floor(share)), kind="stable")[: max(max_images - take.sum(), 0)]:
        take[i] += 1
    while take.sum() > max_images:  # the minimum of one pushed the total over: trim the largest class
        take[np.argmax(take)] -= 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _max_train_images(name: str, cfg: ClassicalConfig) -> int | None:
    return cfg.svm.max_train_images if name == "svm" else None


@dataclass
class TrainedModel:
    name: str
    model: ImageClassifier
    metrics: dict[str, float | None]
    fit_seconds: float
    n_fit: int = 0  # training images the model was fitted on (the SVM may use a subset)
    best_params: dict = field(default_factory=dict)
    search_score: float | None = None


@dataclass
class TrainResult:
    models: dict[str, TrainedModel]
    feature_seconds: float
    feature_blocks: dict[str, int]
    n_train: int
    n_val: int


def train_all(cfg: ClassicalConfig, train_images: np.ndarray, train_labels: np.ndarray,
              val_images: np.ndarray, val_labels: np.ndarray, class_names: tuple[str, ...],
              seed: int) -> TrainResult:
    """Extract features once, fit every model of ``cfg.models``, score each on the validation split."""
    t0 = time.perf_counter()
    features: FeatureUnion = make_features(cfg)
    x_train = features.fit_transform(train_images)
    x_val = features.transform(val_images)
    feature_seconds = time.perf_counter() - t0
    blocks = feature_blocks(features)
    log.info("features %s: %d dims, %d + %d images in %.1f s", blocks, x_train.shape[1], len(x_train),
             len(x_val), feature_seconds)

    heads: dict[str, Pipeline] = {}
    trained: dict[str, TrainedModel] = {}
    for name in cfg.voting_members:
        pipe = head(name, cfg, seed)
        best, score = {}, None
        x_fit, y_fit = x_train, train_labels
        subset = fit_subset(train_labels, _max_train_images(name, cfg), seed)
        if subset is not None:
            x_fit, y_fit = x_train[subset], train_labels[subset]
            log.info("%s: fitting on a stratified subset of %d of %d training images (max_train_images)", name,
                     len(subset), len(train_labels))
        t0 = time.perf_counter()
        if cfg.search.enabled and getattr(cfg.search, name):
            best, score = search(name, pipe, cfg, x_fit, y_fit, x_val, val_labels)
            pipe.set_params(**{_GRID_PARAMS[name][k]: v for k, v in best.items()})
            log.info("%s: best %s (validation %s %.3f)", name, best, cfg.search.scoring, score)
        pipe.fit(x_fit, y_fit)
        seconds = time.perf_counter() - t0
        heads[name] = pipe
        if name in cfg.models:
            trained[name] = _finish(name, features, pipe, x_val, val_labels, class_names, seconds, best, score,
                                    len(y_fit))

    if "voting" in cfg.models:
        members = cfg.voting_members
        voting = VotingClassifier([(m, FrozenEstimator(heads[m])) for m in members], voting="soft",
                                  weights=cfg.voting.weights)
        t0 = time.perf_counter()
        voting.fit(x_train, train_labels)  # members are frozen: fitting only records the classes
        # fitting the ensemble costs what fitting its members cost (plus their searches)
        seconds = time.perf_counter() - t0 + sum(trained[m].fit_seconds for m in members if m in trained)
        trained["voting"] = _finish("voting", features, voting, x_val, val_labels, class_names, seconds, {}, None,
                                    len(x_train))
    return TrainResult({m: trained[m] for m in cfg.models}, feature_seconds, blocks, len(x_train), len(x_val))


def _finish(name, features, fitted, x_val, y_val, class_names, seconds, best, score, n_fit) -> TrainedModel:
    proba = fitted.predict_proba(x_val)
    metrics = classification_metrics(y_val, _full_proba(proba, fitted.classes_, len(class_names)))
    log.info("%s: validation %s, fit %.1f s", name, {k: round(v, 3) for k, v in metrics.items() if v is not None},
             seconds)
    model = ImageClassifier([("features", features), ("model", fitted)], class_names=tuple(class_names))
    return TrainedModel(name, model, metrics, seconds, n_fit, best, score)


def _full_proba(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities with one column per class index, also for classes absent from training."""
    if proba.shape[1] == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return proba
    full = np.zeros((len(proba), n_classes))
    full[:, np.asarray(classes, dtype=int)] = proba
    return full
