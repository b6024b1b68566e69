"""Load a saved classifier and predict on uint8 images, with the training-time preprocessing.

    clf = load("models/efficientnet_lite0/seed42/model.pt")   # TorchClassifier.load likewise
    proba = clf.predict_proba(images)          # uint8 (N, H, W, 3) -> float (N, C)
    clf.class_names, clf.name, clf.model, clf.preprocess(images), clf.gradcam_target_layers()
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medpipe.models.factory import build_classifier
from medpipe.training.checkpoint import load_checkpoint
from medpipe.training.data import nchw_uint8, to_float


class TorchClassifier:
    def __init__(self, model: nn.Module, name: str, class_names: Sequence[str], input_size: int,
                 mean: Sequence[float], std: Sequence[float], spec: dict[str, Any] | None = None,
                 batch_size: int = 64) -> None:
        self.model = model.eval()
        self.name = name
        self.class_names = tuple(class_names)
        self.input_size = int(input_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.spec = dict(spec or {})
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path, batch_size: int = 64) -> TorchClassifier:
        state = load_checkpoint(path)
        extra = state["extra"]
        missing = {"name", "spec", "class_names", "input_size", "mean", "std"} - set(extra)
        if missing:
            raise ValueError(f"{path} is not a saved classifier: its checkpoint lacks {sorted(missing)}")
        model = build_classifier(extra["spec"], pretrained=False)
        model.load_state_dict(state["model"])
        return cls(model, extra["name"], extra["class_names"], extra["input_size"], extra["mean"],
                   extra["std"], extra["spec"], batch_size)

    def extra(self) -> dict[str, Any]:
        """What a checkpoint must carry for :meth:`load` to rebuild this classifier."""
        return {"name": self.name, "spec": self.spec, "class_names": list(self.class_names),
                "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float (N, 3, S, S) as in training (without augmentation)."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim == 4 and images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        return to_float(nchw_uint8(images.astype(np.uint8, copy=False)), self.input_size, self.mean, self.std)

    @torch.inference_mode()
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        self.model.eval()
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(images), self.batch_size):
            x = self.preprocess(images[start:start + self.batch_size]).to(device)
            out.append(torch.softmax(self.model(x).float(), dim=1).cpu())
        if not out:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return torch.cat(out).numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.predict_proba(images).argmax(axis=1)

    def gradcam_target_layers(self) -> list[nn.Module]:
        return [self.model.gradcam_layer]


def load(path: str | Path) -> TorchClassifier:
    """The classifier saved in a training checkpoint (the loader the ``train`` stage names in MLflow)."""
    return TorchClassifier.load(path)
