"""What every PNG figure for people shares: colours, fonts, resolution, and byte-for-byte reproducible files.

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot state, no GUI backend)
under matplotlib's default style plus the overrides below, whatever a user's ``matplotlibrc`` says, and saved
at a fixed dpi without the ``Software`` metadata entry (the matplotlib version), so a rerun writes the same bytes.
Colours are the Okabe-Ito palette (Okabe & Ito 2008), told apart with the common colour-vision deficiencies;
heat maps use perceptually uniform colormaps (viridis, inferno), never jet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from medpipe.io import atomic_path

BLUE, ORANGE, GREEN, VERMILLION = "#0072B2", "#E69F00", "#009E73", "#D55E00"
PURPLE, SKY_BLUE, YELLOW, BLACK = "#CC79A7", "#56B4E9", "#F0E442", "#000000"
OKABE_ITO = (BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY_BLUE, YELLOW, BLACK)
TRUTH_COLOUR, PREDICTION_COLOUR = BLUE, ORANGE   # mask contours: truth solid blue, prediction dashed orange
HEAT_CMAP = "inferno"                            # Grad-CAM relevance
RATE_CMAP = "Blues"                              # confusion matrix cells (a single-hue sequential map)
DPI = 100
TEXT_COLOUR_ON_DARK = 0.5                        # a confusion cell's text turns white above this rate


def _style() -> dict:
    from cycler import cycler

    return {"axes.prop_cycle": cycler(color=list(OKABE_ITO)), "image.cmap": "viridis", "font.size": 9,
            "axes.titlesize": 9, "axes.labelsize": 9, "figure.titlesize": 11, "legend.fontsize": 8,
            "legend.framealpha": 0.9, "savefig.dpi": DPI, "savefig.facecolor": "white", "figure.facecolor": "white"}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """matplotlib's defaults (not the user's matplotlibrc) plus the house style, while a figure is drawn and saved."""
    import matplotlib.style

    with matplotlib.style.context(["default", _style()]):
        yield


def new_figure(**kwargs):
    """A Figure on the Agg canvas, outside pyplot (nothing to close, no backend switch); call it under ``style()``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kwargs.setdefault("layout", "constrained")
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path, dpi: int = DPI) -> None:
    """Write ``fig`` as a PNG at a fixed dpi, with no metadata that would change from one run to the next."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})


def texts(fig) -> list[str]:
    """Every string a saved figure shows, in drawing order: titles, axis labels, the tick labels in view, legends,
    annotations; nothing of a hidden artist or of an axis turned off (for tests and checks)."""
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.text import Text

    found: list[str] = []

    def walk(artist) -> None:
        if not artist.get_visible():
            return
        if isinstance(artist, Axis):
            low, high = sorted(artist.get_view_interval())
            slack = 1e-9 * max(1.0, high - low)
            locs = artist.get_majorticklocs()
            ticks = [t for t, at in zip(artist.get_major_ticks(len(locs)), locs, strict=True)
                     if low - slack <= at <= high + slack]
            shown = [*(t.label1 for t in ticks), *(t.label2 for t in ticks), artist.label, artist.offsetText]
            found.extend(t.get_text() for t in shown if t.get_visible() and t.get_text())
        elif isinstance(artist, Text):
            found.extend([artist.get_text()] if artist.get_text() else [])
        else:
            for child in artist.get_children():
                if not (isinstance(artist, Axes) and not artist.axison and isinstance(child, Axis)):
                    walk(child)

    walk(fig)
    return found
