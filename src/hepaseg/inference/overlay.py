"""A PNG montage of the slices with the most tumour, prediction and ground truth outlined.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display
needed) and written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hepaseg.io.atomic import atomic_path

__all__ = ["MAX_OUTLINE_PIXELS", "draw_overlay", "select_slices"]

PRED_COLOR = "#ff3030"  # red
GT_COLOR = "#30ff30"  # green


def select_slices(pred_mask: np.ndarray, gt_mask: np.ndarray | None, n: int) -> list[int]:
    """The (sorted) indices of the ``n`` slices with the most tumour pixels.

    Ranks by the prediction, or by the ground truth when the prediction is empty; when both
    are empty, ``n`` evenly spaced slices. Ties go to the lower index.
    """
    z = pred_mask.shape[0]
    n = min(n, z)
    ranking = None
    for mask in (pred_mask, gt_mask):
        if mask is not None and np.any(mask):
            ranking = np.count_nonzero(mask.reshape(z, -1), axis=1)
            break
    if ranking is None:
        return sorted({int(i) for i in np.linspace(0, z - 1, n).round()})
    # Stable sort on -count: the most tumour first, lower slice index first among ties.
    order = np.argsort(-ranking, kind="stable")
    chosen = [int(i) for i in order[:n] if ranking[i] > 0]
    return sorted(chosen)


#: Above this many edge pixels in one slice a mask is shaded instead of outlined: matplotlib's
#: contour of a speckled slice (a badly trained model) is tens of thousands of paths and took
#: seconds; the shading costs one image whatever the mask.
MAX_OUTLINE_PIXELS = 4000


def _outline(ax, mask2d: np.ndarray, color: str, aspect: float) -> None:
    """Outline ``mask2d`` (y, x) on ``ax``, or shade it (translucent) when its outline is too ragged."""
    inner = mask2d.copy()
    inner[1:] &= mask2d[:-1]
    inner[:-1] &= mask2d[1:]
    inner[:, 1:] &= mask2d[:, :-1]
    inner[:, :-1] &= mask2d[:, 1:]
    if np.count_nonzero(mask2d & ~inner) <= MAX_OUTLINE_PIXELS:
        ax.contour(mask2d.astype(np.float32), levels=[0.5], colors=color, linewidths=1.0)
        return
    from matplotlib.colors import to_rgb

    rgba = np.zeros(mask2d.shape + (4,), dtype=np.float32)
    rgba[mask2d] = (*to_rgb(color), 0.45)
    ax.imshow(rgba, interpolation="nearest", aspect=aspect)


def draw_overlay(
    volume_image: np.ndarray,
    pred_mask: np.ndarray,
    path: str | os.PathLike,
    *,
    gt_mask: np.ndarray | None = None,
    window: Sequence[float] = (-200, 250),
    n: int = 6,
    spacing: Sequence[float] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG montage of the ``n`` slices with the most tumour.

    Args:
        volume_image: ``(z, y, x)`` CT in HU.
        pred_mask: ``(z, y, x)`` predicted tumour (nonzero = tumour), outlined in red (shaded
            instead in a slice whose outline has more than :data:`MAX_OUTLINE_PIXELS` edge pixels).
        path: the PNG to write (atomically).
        gt_mask: optional ``(z, y, x)`` ground-truth tumour, outlined in green (same rule).
        window: display window ``(lo, hi)`` in HU (default ``(-200, 250)``, abdomen).
        n: number of slices (default 6; fewer when fewer slices hold tumour).
        spacing: optional ``(z, y, x)`` mm: areas in mm^2 and true pixel aspect; else pixels.
        title: optional figure title (e.g. the case id).

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(volume_image)
    pred = np.asarray(pred_mask) != 0
    gt = None if gt_mask is None else np.asarray(gt_mask) != 0
    for name, arr in (("pred_mask", pred), ("gt_mask", gt)):
        if arr is not None and arr.shape != image.shape:
            raise ValueError(f"{name} shape {arr.shape} differs from volume_image shape {image.shape}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    slices = select_slices(pred, gt, n)

    if spacing is not None:
        pixel_area, unit, aspect = float(spacing[1]) * float(spacing[2]), "mm²", float(spacing[1]) / float(spacing[2])
    else:
        pixel_area, unit, aspect = 1.0, "px", 1.0
    cols = min(3, len(slices))
    rows = math.ceil(len(slices) / cols)
    # constrained layout keeps each row's titles clear of the images above (tight_layout let
    # them overlap once the axes are switched off).
    fig = Figure(figsize=(4 * cols, 4 * rows + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, k in zip(axes.flat, slices):
        ax.imshow(image[k], cmap="gray", vmin=float(window[0]), vmax=float(window[1]),
                  interpolation="nearest", aspect=aspect)
        parts = [f"z={k}", f"pred {pred[k].sum() * pixel_area:.0f} {unit}"]
        if pred[k].any():
            _outline(ax, pred[k], PRED_COLOR, aspect)
        if gt is not None:
            parts.append(f"gt {gt[k].sum() * pixel_area:.0f} {unit}")
            if gt[k].any():
                _outline(ax, gt[k], GT_COLOR, aspect)
        ax.set_title("  ".join(parts), fontsize=9)
    legend = "red: prediction" + (", green: ground truth" if gt is not None else "")
    fig.suptitle(f"{title}  ({legend})" if title else legend, fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
