"""Figures for runs and scene outputs: confusion matrix, training curves, class-map preview.

Figures are built with :class:`matplotlib.figure.Figure` directly (Agg canvas), never through
``pyplot``: no global figure registry to leak memory in long-lived Ray workers, no GUI backend
needed on a headless node. Callers save them (``fig.savefig``) or log them
(:func:`bimors.tracking.log_figure`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

# Above this many classes the per-cell counts would be unreadably small.
_MAX_ANNOTATED_CLASSES = 20


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def confusion_matrix_figure(matrix: np.ndarray, classnames: Sequence[str], title: str) -> Figure:
    """Rows are true classes, columns predictions. Colours are row-normalised (per-class recall)
    so that rare classes are as visible as common ones; counts are printed when they fit."""
    matrix = np.asarray(matrix)
    n = len(classnames)
    if matrix.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {matrix.shape}, expected ({n}, {n}) for {n} classes")
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros(matrix.shape, float), where=totals > 0)

    side = min(max(5.0, 0.28 * n + 2.5), 18.0)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="fraction of true class")
    labels = [name.replace("_", " ") for name in classnames]
    fontsize = 9 if n <= 20 else max(5, 9 - (n - 20) // 8)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), labels, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(matrix) / matrix.sum() if matrix.sum() else 0.0
    ax.set_title(f"{title} (accuracy {accuracy:.1%})")
    if n <= _MAX_ANNOTATED_CLASSES:
        for row in range(n):
            for col in range(n):
                if matrix[row, col]:
                    dark = normalised[row, col] > 0.5
                    ax.text(col, row, f"{matrix[row, col]:g}", ha="center", va="center", fontsize=fontsize - 1,
                            color="white" if dark else "black")
    return fig


def curves_figure(history: Sequence[dict[str, float]]) -> Figure:
    """Loss, accuracies and learning rate per epoch, in two panels sharing the epoch axis: the
    learning rate spans orders of magnitude (warm-up 1e-5) and needs its own log scale."""
    epochs = [h["epoch"] for h in history]
    series = lambda key: [h.get(key, np.nan) for h in history]  # noqa: E731
    fig = _figure(7.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])

    top.plot(epochs, series("loss"), "o-", color="tab:red", label="train loss")
    top.set_ylabel("loss")
    acc = top.twinx()
    acc.plot(epochs, series("train_acc"), "s-", color="tab:blue", label="train accuracy")
    acc.plot(epochs, series("val_acc"), "^-", color="tab:green", label="val accuracy")
    acc.set_ylabel("accuracy")
    acc.set_ylim(0.0, 1.0)
    handles = top.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    top.legend(handles, [h.get_label() for h in handles], loc="lower center", bbox_to_anchor=(0.5, 1.0),
               ncols=3, frameon=False)  # above the panel: never over the curves

    bottom.plot(epochs, series("lr"), ".-", color="tab:gray")
    bottom.set_yscale("log")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("epoch")
    return fig


def class_palette(n: int) -> list[tuple[float, ...]]:
    """``n`` categorical colours (RGB in 0..1), the same in previews and GeoTIFF colour tables."""
    palette = colormaps["tab20"].colors if n <= 20 else colormaps["turbo"](np.linspace(0, 1, n))
    return [tuple(float(v) for v in colour[:3]) for colour in palette[:n]]


def class_map_preview(
    class_map: np.ndarray, classnames: Sequence[str], nodata_value: int = -1, title: str | None = None
) -> Figure:
    """A scene's class map in categorical colours with a legend of the classes that occur;
    ``nodata_value`` pixels are drawn transparent over a light grey background."""
    class_map = np.asarray(class_map)
    if class_map.ndim != 2:
        raise ValueError(f"class map must be 2-D (rows, cols), got shape {class_map.shape}")
    n = len(classnames)
    cmap = ListedColormap(class_palette(n) if n else ["white"])
    masked = np.ma.masked_where((class_map == nodata_value) | (class_map < 0) | (class_map >= n), class_map)

    height, width = class_map.shape
    aspect = width / max(height, 1)
    fig = _figure(min(6.0 * aspect, 12.0) + 3.0, 6.0)
    ax = fig.add_subplot()
    ax.set_facecolor("0.85")
    ax.imshow(masked, cmap=cmap, vmin=-0.5, vmax=max(n, 1) - 0.5, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    present = sorted(int(c) for c in np.unique(masked.compressed()))
    handles = [Patch(color=cmap(c), label=classnames[c].replace("_", " ")) for c in present]
    if np.ma.count_masked(masked):
        handles.append(Patch(facecolor="0.85", edgecolor="0.5", label="no data"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig
