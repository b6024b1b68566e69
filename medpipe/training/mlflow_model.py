"""The MLflow pyfunc flavour of a saved classifier: uint8 images (N, H, W, 3) in, class probabilities out.

    model = mlflow.pyfunc.load_model("models:/medpipe-busi-efficientnet_lite0/1")
    proba = model.predict(images)               # float32 (N, C), columns in class-name order
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from medpipe.io import write_json
from medpipe.tracking import pinned_requirements, registration_record
from medpipe.training.predictor import TorchClassifier


class ClassifierPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.classifier = TorchClassifier.load(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would derive a schema from them
        images = np.asarray(model_input)
        return self.classifier.predict_proba(images.astype(np.uint8, copy=False))


def log_classifier(checkpoint: Path, classifier: TorchClassifier, example: np.ndarray,
                   registered_name: str, sidecar: Path) -> dict[str, Any]:
    """Log the classifier (weights only, no optimiser state) to the active run, register it, write the sidecar."""
    from mlflow.models import infer_signature

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["optimizer"] = state["scheduler"] = None
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / "classifier.pt"
        torch.save(state, slim)
        (Path(tmp) / "classes.json").write_text(json.dumps(list(classifier.class_names)))
        example = np.ascontiguousarray(example.astype(np.uint8))
        signature = infer_signature(example, classifier.predict_proba(example))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ClassifierPyfunc(),
            artifacts={"checkpoint": str(slim), "classes": str(Path(tmp) / "classes.json")},
            signature=signature,
            input_example=example,
            registered_model_name=registered_name,
            pip_requirements=pinned_requirements("torch", "torchvision", "timm", "numpy", "mlflow"),
        )
    record = registration_record(info, registered_name)
    write_json(sidecar, record)
    return record
