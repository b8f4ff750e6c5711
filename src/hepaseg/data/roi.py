"""The liver region of interest: one square in-plane box per volume, shared by training and inference.

``hepaseg prepare --roi liver`` crops every kept slice of a case to the box
computed here from the case's LABEL (liver including tumour), and the cascade
(:mod:`hepaseg.inference.cascade`) crops to the box computed here from the
PREDICTED liver; both call :func:`liver_crop_box`, so the tumour stage sees at
inference the same framing it was trained on.

Box rule (:func:`liver_crop_box`), in original pixel coordinates
----------------------------------------------------------------
1. The in-plane bounding box of the liver over ALL slices of the volume (one box
   per case, not one per slice: the framing, and so the apparent liver size at
   the network's input, stays constant along z, and a slice's box never depends
   on how much liver that slice happens to show).
2. Grown by ``margin_mm`` on every side: ``ceil(margin_mm / spacing)`` pixels
   along y and along x (spacing in mm, so the margin is physical).
3. Made square, ``side = max(height, width)``, by growing the shorter axis
   around its centre (an odd extra pixel goes to the far end). A square box
   resized to ``size x size`` keeps the aspect ratio, so a round lesion stays
   round at the network's input.
4. Moved inside the image: along an axis where the square fits, it is shifted
   (not shrunk) to lie within ``[0, n)``; along an axis where it is larger than
   the image, it is centred on the image and the crop is padded: image pixels
   outside read :data:`ROI_FILL_HU` (air), label pixels read 0.

The box is ``(y0, y1, x0, x1)``, half-open (``y0 <= y < y1``), with
``y1 - y0 == x1 - x0 == side``; ``y0 < 0`` or ``y1 > height`` only in case 4.
:func:`crop_slices` cuts it out (padding where needed) and
:func:`paste_slices` puts a ``side x side`` result back into full slices, so
``paste_slices(crop_slices(a, box), box, a.shape[1:])`` equals ``a`` inside
the box and 0 outside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["ROI_FILL_HU", "ROI_MODES", "box_overlap", "box_side", "crop_slices", "liver_crop_box", "paste_slices"]

#: ``prepare --roi`` choices (``None``: whole slices).
ROI_MODES = ("liver",)
#: HU read outside the image when a box is larger than the image (air: below every CT window).
ROI_FILL_HU = -1024.0


def _place(lo: int, hi: int, side: int, n: int) -> tuple[int, int]:
    """Grow ``[lo, hi)`` to ``side`` around its centre, then shift it into ``[0, n)`` when it fits."""
    extra = side - (hi - lo)
    lo -= extra // 2
    hi += extra - extra // 2
    if side <= n:
        shift = max(0, -lo) - max(0, hi - n)  # at most one of the two is non-zero
        return lo + shift, hi + shift
    lo = -((side - n) // 2)  # larger than the image: centre on it, pad both sides
    return lo, lo + side


def liver_crop_box(
    mask: np.ndarray, spacing: Sequence[float], *, margin_mm: float = 10.0
) -> tuple[int, int, int, int] | None:
    """The square in-plane crop box around the liver of a volume (see the module docstring).

    Args:
        mask: ``(z, y, x)`` liver mask (bool or 0/1; liver including tumour).
        spacing: voxel size in mm, ``(z, y, x)``; only ``y`` and ``x`` are used.
        margin_mm: margin added on each side of the liver's bounding box, mm, >= 0 (default 10).

    Returns:
        ``(y0, y1, x0, x1)`` half-open, square, in original pixel coordinates, or None when the
        mask is empty.

    Example::

        box = liver_crop_box(label > 0, (2.5, 0.8, 0.8), margin_mm=10.0)  # 13 px margin
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask: expected a (z, y, x) array, got shape {mask.shape}")
    if not (math.isfinite(float(margin_mm)) and margin_mm >= 0):
        raise ValueError(f"margin_mm: expected a finite number >= 0, got {margin_mm!r}")
    sy, sx = float(spacing[1]), float(spacing[2])
    if not (sy > 0 and sx > 0):
        raise ValueError(f"spacing: expected positive in-plane spacing (mm), got {tuple(spacing)}")
    plane = mask.any(axis=0)  # (y, x): the box spans every slice of the volume
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if rows.size == 0:
        return None
    # The small epsilon keeps 10 mm / 0.8 mm = 12.5 -> 13 but 10 mm / 0.5 mm = 20 -> 20 despite rounding.
    my, mx = math.ceil(margin_mm / sy - 1e-9), math.ceil(margin_mm / sx - 1e-9)
    y0, y1 = int(rows[0]) - my, int(rows[-1]) + 1 + my
    x0, x1 = int(cols[0]) - mx, int(cols[-1]) + 1 + mx
    side = max(y1 - y0, x1 - x0)
    height, width = plane.shape
    y0, y1 = _place(y0, y1, side, height)
    x0, x1 = _place(x0, x1, side, width)
    return y0, y1, x0, x1


def box_side(box: Sequence[int]) -> int:
    """Side length in pixels of a square ``(y0, y1, x0, x1)`` box."""
    return int(box[1]) - int(box[0])


def box_overlap(box: Sequence[int], height: int, width: int) -> tuple[slice, slice, slice, slice]:
    """(image rows, image cols, crop rows, crop cols) of the part of ``box`` inside the image."""
    y0, y1, x0, x1 = (int(b) for b in box)
    iy0, iy1, ix0, ix1 = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    return (
        slice(iy0, iy1),
        slice(ix0, ix1),
        slice(iy0 - y0, iy1 - y0),
        slice(ix0 - x0, ix1 - x0),
    )


def crop_slices(
    volume: np.ndarray,
    box: Sequence[int],
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    fill: float = ROI_FILL_HU,
) -> np.ndarray:
    """Cut ``box`` out of axial slices, padding with ``fill`` where the box leaves the image.

    Args:
        volume: ``(z, y, x)`` image (HU) or label map.
        box: ``(y0, y1, x0, x1)`` half-open, from :func:`liver_crop_box`.
        indices: z indices to crop (default: all slices).
        fill: value outside the image (default :data:`ROI_FILL_HU`; use 0 for labels).

    Returns:
        ``(n, y1 - y0, x1 - x0)`` array of ``volume``'s dtype.
    """
    idx = np.arange(volume.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
    y0, y1, x0, x1 = (int(b) for b in box)
    rows, cols, crop_rows, crop_cols = box_overlap(box, volume.shape[1], volume.shape[2])
    if crop_rows == slice(0, y1 - y0) and crop_cols == slice(0, x1 - x0):
        return np.asarray(volume[idx, rows, cols])  # inside the image: no padding (the usual case)
    out = np.full((idx.size, y1 - y0, x1 - x0), fill, dtype=volume.dtype)
    out[:, crop_rows, crop_cols] = volume[idx, rows, cols]
    return out


def paste_slices(crops: np.ndarray, box: Sequence[int], shape_yx: tuple[int, int]) -> np.ndarray:
    """Put ``(n, side, side)`` crops back at ``box`` in zero slices of ``shape_yx = (y, x)``.

    Returns:
        ``(n, y, x)`` array of ``crops``' dtype: the crops' in-image part at ``box``, 0 elsewhere.
    """
    y0, y1, x0, x1 = (int(b) for b in box)
    if crops.shape[1:] != (y1 - y0, x1 - x0):
        raise ValueError(f"crops: expected (n, {y1 - y0}, {x1 - x0}) for box {tuple(box)}, got {crops.shape}")
    rows, cols, crop_rows, crop_cols = box_overlap(box, shape_yx[0], shape_yx[1])
    out = np.zeros((crops.shape[0], *shape_yx), dtype=crops.dtype)
    out[:, rows, cols] = crops[:, crop_rows, crop_cols]
    return out
