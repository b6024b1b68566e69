"""MLflow pyfunc flavour of both segmenters: uint8 images (N, H, W, 3) in, lesion probabilities (N, H, W) out.

    model = mlflow.pyfunc.load_model("models:/medpipe-busi-unet/1")
    prob = model.predict(images)        # float32 (N, H, W); threshold at 0.5 for masks

The served model returns probabilities; the stage's masks add the threshold and the optional clean-up
(``medpipe.segmentation.postprocess``) recorded in the run's params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np

import medpipe
from medpipe.io import write_json
from medpipe.tracking import pinned_requirements, registration_record


class SegmenterPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from medpipe.segmentation.predictor import load_segmenter

        self.segmenter = load_segmenter(Path(context.artifacts["model"]))

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads type hints as a schema
        return self.segmenter.predict_proba(np.asarray(model_input).astype(np.uint8, copy=False))


def log_segmenter(model_file: Path, segmenter: Any, example: np.ndarray, registered_name: str,
                  sidecar: Path) -> dict[str, Any]:
    """Log a saved segmenter to the active run, register it, and write the sidecar the evaluate stage reads."""
    from mlflow.models import infer_signature

    example = np.ascontiguousarray(example.astype(np.uint8))
    signature = infer_signature(example, segmenter.predict_proba(example))
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=SegmenterPyfunc(),
        artifacts={"model": str(model_file)},
        signature=signature,
        input_example=example,
        registered_model_name=registered_name,
        code_paths=[str(Path(medpipe.__file__).parent)],  # the medpipe package travels with the model
        pip_requirements=pinned_requirements("torch", "timm", "scikit-learn", "scikit-image", "numpy", "mlflow"),
    )
    record = registration_record(info, registered_name)
    write_json(sidecar, record)
    return record
