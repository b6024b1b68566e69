"""Grad-CAM overlays for deep classifiers, with the maintained ``grad-cam`` library (pytorch_grad_cam).

The model supplies its own ``preprocess`` (uint8 -> normalised NCHW tensor), ``model`` and
``gradcam_target_layers()``; the heat map explains the *predicted* class of each image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medpipe.io import atomic_path

METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "layercam": "LayerCAM"}


def sample_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A fixed, seeded sample of up to ``per_class`` indices of each class, in class order."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picks.extend(sorted(rng.choice(members, size=min(per_class, len(members)), replace=False)))
    return np.asarray(picks, dtype=np.int64)


def cam_maps(model, images: np.ndarray, method: str = "gradcam") -> tuple[np.ndarray, np.ndarray]:
    """(heat maps (N, H, W) in 0..1, predicted classes) for uint8 images (N, H, W, 3)."""
    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = getattr(pytorch_grad_cam, METHODS[method])
    predicted = np.asarray(model.predict_proba(images)).argmax(axis=1)
    inputs = model.preprocess(images)
    with torch.enable_grad(), cam_class(model=model.model, target_layers=list(model.gradcam_target_layers())) as cam:
        maps = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(int(c)) for c in predicted])
    return np.asarray(maps, dtype=np.float32), predicted


def overlay_figure(path: Path, title: str, images: np.ndarray, maps: np.ndarray, labels: np.ndarray,
                   predicted: np.ndarray, class_names: Sequence[str]) -> None:
    """A grid: each image beside its Grad-CAM overlay, titled with the true and predicted class."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam.utils.image import show_cam_on_image

    n = len(images)
    cols = 4  # two (image, overlay) pairs per row
    rows = max(1, int(np.ceil(n / 2)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, 2)
        heat = maps[i]
        if heat.shape != images[i].shape[:2]:  # the model may resize its input (TorchClassifier input_size)
            heat = cv2.resize(heat, images[i].shape[1::-1], interpolation=cv2.INTER_LINEAR)
        overlay = show_cam_on_image(images[i].astype(np.float32) / 255.0, heat, use_rgb=True)
        axes[r, 2 * c].imshow(images[i])
        axes[r, 2 * c].set_title(f"true: {class_names[labels[i]]}", fontsize=8)
        axes[r, 2 * c + 1].imshow(overlay)
        ok = "ok" if labels[i] == predicted[i] else "WRONG"
        axes[r, 2 * c + 1].set_title(f"pred: {class_names[predicted[i]]} ({ok})", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
