"""Grad-CAM overlays for deep classifiers, with the maintained ``grad-cam`` library (pytorch_grad_cam).

The model supplies its own ``preprocess`` (uint8 -> normalised NCHW tensor), ``model`` and
``gradcam_target_layers()``; the heat map explains the *predicted* class of each image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "layercam": "LayerCAM"}
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "layercam": "LayerCAM"}


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
                   predicted: np.ndarray, class_names: Sequence[str], method: str = "gradcam"):
    """A grid: each image beside its heat map overlay, titled with the true and the predicted class, and one
    colour bar (perceptually uniform ``inferno``); returns the Figure."""
    import cv2
    import matplotlib.cm
    import matplotlib.colors

    from medpipe.evaluation import figures

    n = len(images)
    cols = 4  # two (image, overlay) pairs per row
    rows = max(1, int(np.ceil(n / 2)))
    with figures.style():
        fig = figures.new_figure(figsize=(cols * 2.3 + 1.2, rows * 2.6 + 0.6))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for i in range(n):
            r, c = divmod(i, 2)
            heat = maps[i]
            if heat.shape != images[i].shape[:2]:  # the model may resize its input (TorchClassifier input_size)
                heat = cv2.resize(heat, images[i].shape[1::-1], interpolation=cv2.INTER_LINEAR)
            left, right = axes[r, 2 * c], axes[r, 2 * c + 1]
            left.imshow(images[i], interpolation="nearest")
            left.set_title(f"true: {class_names[labels[i]]}", fontsize=8)
            right.imshow(images[i], interpolation="nearest")
            heat = np.clip(heat, 0.0, 1.0)
            # opacity grows with relevance: the image shows through where the model did not look, and the
            # colour of a relevant region stays close to its colour in the colour bar
            right.imshow(heat, cmap=figures.HEAT_CMAP, vmin=0.0, vmax=1.0, alpha=0.15 + 0.7 * heat,
                         interpolation="nearest")
            verdict = "correct" if labels[i] == predicted[i] else "WRONG"
            right.set_title(f"predicted: {class_names[predicted[i]]} ({verdict})", fontsize=8)
        scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0.0, 1.0), figures.HEAT_CMAP)
        fig.colorbar(scale, ax=axes, shrink=min(0.9, 0.35 + 0.15 * rows), pad=0.02,
                     label=f"{METHOD_LABELS.get(method, method)} relevance for the predicted class\n"
                           f"(0 = none, 1 = highest in the image)")
        fig.suptitle(title)
        figures.save_png(fig, path)
    return fig
