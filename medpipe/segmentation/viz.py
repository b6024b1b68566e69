"""A PNG grid for people: images with the true (green) and predicted (red) lesion contours."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medpipe.io import atomic_path


def pick_examples(masks: np.ndarray, n: int) -> np.ndarray:
    """``n`` indices spread over the split, lesion images first (the informative ones), in a fixed order."""
    lesion = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
    empty = np.flatnonzero(~masks.reshape(len(masks), -1).any(1))
    n_empty = min(len(empty), max(1, n // 6)) if len(empty) else 0
    n_lesion = min(len(lesion), n - n_empty)
    take = [lesion[np.linspace(0, len(lesion) - 1, n_lesion).astype(int)] if n_lesion else lesion[:0],
            empty[np.linspace(0, len(empty) - 1, n_empty).astype(int)] if n_empty else empty[:0]]
    return np.concatenate(take)


def contour_grid(path: str | Path, images: np.ndarray, true: np.ndarray, pred: np.ndarray,
                 dice: np.ndarray, title: str, columns: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0:
        return
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, ax in enumerate(axes.ravel()[:n]):
        ax.imshow(images[i], cmap="gray")
        if true[i].any():
            ax.contour(true[i], levels=[0.5], colors="lime", linewidths=1.0)
        if pred[i].any():
            ax.contour(pred[i], levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(f"Dice {dice[i]:.2f}" if true[i].any() else f"empty, FP {pred[i].mean():.1%}", fontsize=8)
    fig.suptitle(f"{title} (green: truth, red: prediction)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
