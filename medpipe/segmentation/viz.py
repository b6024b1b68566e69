"""A PNG grid for people: images with the true (solid blue) and predicted (dashed orange) lesion contours."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pick_examples(masks: np.ndarray, n: int) -> np.ndarray:
    """``n`` indices spread over the split, lesion images first (the informative ones), in a fixed order."""
    lesion = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
    empty = np.flatnonzero(~masks.reshape(len(masks), -1).any(1))
    n_empty = min(len(empty), max(1, n // 6)) if len(empty) else 0
    n_lesion = min(len(lesion), n - n_empty)
    take = [lesion[np.linspace(0, len(lesion) - 1, n_lesion).astype(int)] if n_lesion else lesion[:0],
            empty[np.linspace(0, len(empty) - 1, n_empty).astype(int)] if n_empty else empty[:0]]
    return np.concatenate(take)


def panel_title(true: np.ndarray, pred: np.ndarray, dice: float) -> str:
    """An image's Dice, and for an image without a lesion the share of it predicted as lesion."""
    if true.any():
        return f"Dice {dice:.2f}"
    return f"no lesion: Dice {dice:.2f}\npredicted lesion area {np.asarray(pred, bool).mean():.1%}"


def contour_grid(path: str | Path, images: np.ndarray, true: np.ndarray, pred: np.ndarray,
                 dice: np.ndarray, title: str, columns: int = 6):
    """Images with the true (solid blue) and predicted (dashed orange) lesion contours, the Dice of each, a legend;
    returns the Figure (None for no image)."""
    from matplotlib.lines import Line2D

    from medpipe.evaluation import figures

    n = len(images)
    if n == 0:
        return None
    columns = min(columns, n)
    rows = -(-n // columns)
    truth = {"colors": figures.TRUTH_COLOUR, "linestyles": "solid", "linewidths": 1.6}
    prediction = {"colors": figures.PREDICTION_COLOUR, "linestyles": "dashed", "linewidths": 1.6}
    with figures.style():
        fig = figures.new_figure(figsize=(2.3 * columns + 0.2, 2.5 * rows + 0.9))
        axes = fig.subplots(rows, columns, squeeze=False)
        for ax in axes.ravel():
            ax.set_axis_off()
        for i, ax in enumerate(axes.ravel()[:n]):
            ax.imshow(images[i], cmap="gray", interpolation="nearest")
            if true[i].any():
                ax.contour(true[i], levels=[0.5], **truth)
            if pred[i].any():
                ax.contour(pred[i], levels=[0.5], **prediction)
            ax.set_title(panel_title(true[i], pred[i], float(dice[i])), fontsize=8)
        handles = [Line2D([], [], color=truth["colors"], ls=truth["linestyles"], lw=2, label="truth (expert mask)"),
                   Line2D([], [], color=prediction["colors"], ls=prediction["linestyles"], lw=2,
                          label="prediction")]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False, fontsize=9)
        fig.suptitle(f"{title}: lesion contours")
        figures.save_png(fig, path)
    return fig
