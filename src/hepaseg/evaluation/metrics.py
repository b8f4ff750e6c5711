"""Overlap and surface-distance metrics for binary tumour masks, per slice and per case.

Two entry points:

* :func:`slice_metrics` -- one 2D slice ``(H, W)``: Dice, Jaccard, precision, recall,
  specificity (fractions in ``[0, 1]``), Hausdorff distance and HD95 (pixels). These are the
  quantities of Table 1 of Pang et al. (PAKDD 2020), which averages them over test slices.
* :func:`volume_metrics` -- one 3D case ``(Z, Y, X)`` with voxel spacing in mm in the same
  axis order: Dice, Jaccard, RVD, ASSD, HD95, Hausdorff (mm) and the raw voxel counts from
  which :func:`global_dice` computes the LiTS "Dice global" over a data set.

Surface distances
-----------------
The surface (boundary) of a mask is ``mask XOR binary_erosion(mask)`` with the
face-connected (connectivity 1, "cross") structuring element and everything outside the
array counted as background, so foreground touching the image border is surface. For each
surface pixel of one mask we take the Euclidean distance (scaled by the spacing) to the
nearest surface pixel of the other mask; ``d(P->T)`` and ``d(T->P)`` are the two directed
distance sets. This is exactly what MONAI's ``compute_hausdorff_distance`` (via
``get_mask_edges``) and medpy's ``__surface_distances`` (``connectivity=1``) do.

* ``hausdorff = max(max d(P->T), max d(T->P))`` -- MONAI and medpy agree.
* ``hd95 = max(q95 d(P->T), q95 d(T->P))`` with linear interpolation -- MONAI's
  ``percentile=95`` definition (the same max-of-directions rule as DeepMind's ``surface-distance``).
  medpy's ``hd95`` instead takes the 95th percentile of the *pooled* set
  ``d(P->T) + d(T->P)``; the two agree when both directions have the same distribution
  (e.g. mirror-symmetric configurations) and differ otherwise -- on random 16-48 px masks
  in about 60% of cases, mostly by a fraction of a pixel, medpy's usually smaller. We keep one
  definition (MONAI's) for slices and volumes; the tests show the pooled percentile of our
  :func:`surface_distances` reproduces medpy's ``hd95`` exactly.
* ``assd = mean(d(P->T) + d(T->P))``, the mean over the *pooled* distances of both
  surfaces (Heimann et al. 2009, as used by LiTS); medpy's ``assd`` (0.5) and MONAI's
  symmetric ``compute_average_surface_distance`` both compute this. (medpy 0.4 and older
  averaged the two directed means instead, which differs when the surfaces differ in size.)

Empty-mask policy
-----------------
Every slice/case gets a finite value for every metric (RVD excepted, see below), so no slice silently drops
out of a mean (a NaN would either poison the mean or, with ``nanmean``, vanish from it).

============================  =====  =====  ==========  ======  ============  ===============
case                          dice   jacc.  precision   recall  specificity   hausdorff, hd95
============================  =====  =====  ==========  ======  ============  ===============
both empty                    1      1      1           1       computed (1)  0
target empty, pred not (FP)   0      0      0           1       computed      worst case
target not empty, pred empty  0      0      0           0       computed      worst case
============================  =====  =====  ==========  ======  ============  ===============

* A false-positive slice gets ``recall = 1``: there was nothing to find, so nothing was
  missed; the error is charged to precision (0) and Dice (0).
* A missed tumour gets ``precision = 0``, not the vacuous ``0/0 = 1``: a slice where the
  tumour was missed must not raise the mean precision. (MONAI and medpy return NaN.)
* ``specificity = TN / (TN + FP)`` and is 1.0 when the target has no background pixel
  (MONAI and medpy: NaN).
* "Worst case" distance is the image diagonal ``sqrt(H^2 + W^2)`` pixels for slices, the
  physical diagonal ``sqrt(sum((n_i * spacing_i)^2))`` mm for volumes (and for ASSD).
* ``rvd = (|P| - |T|) / |T|`` is signed: positive = over-segmentation, negative =
  under-segmentation. With an empty target it is 0 when the prediction is empty too and
  ``+inf`` otherwise (any predicted voxel is an unbounded relative over-segmentation); the
  infinity is deliberate so that such cases show up in a mean instead of vanishing --
  report RVD over cases with a tumour, or count these cases separately.

MONAI and medpy return NaN/inf or raise on empty masks; the tests pin our policy against
MONAI's ``ignore_empty=False`` Dice/IoU where they coincide.

Speed: both masks are cropped to the bounding box of their union before erosion (distances are
unchanged: every surface pixel lies inside it), which makes a typical 224x224 tumour slice cost
well under a millisecond. Each direction's distance transform is then taken only over the box
of its query surface grown until no source pixel outside can be nearer (see
:func:`directed_distances`), with the ``edt`` package's exact transform (float32 squared
distances: exact for unit spacing, within about 1e-7 relative of scipy's float64 transform with
a spacing). A speckled prediction of a whole CT volume thus costs one transform of the volume for
``d(P->T)`` and a small box around the reference for ``d(T->P)``, instead of two transforms of
the volume with scipy (19-40 s on 129 x 512 x 512 before; ``hepaseg benchmark`` measures it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import edt
import numpy as np

__all__ = [
    "SLICE_METRICS",
    "VOLUME_METRICS",
    "directed_distances",
    "global_dice",
    "slice_metrics",
    "surface_distances",
    "volume_metrics",
]

#: Keys returned by :func:`slice_metrics`, in table order.
SLICE_METRICS: tuple[str, ...] = (
    "dice",
    "jaccard",
    "precision",
    "recall",
    "specificity",
    "hausdorff",
    "hd95",
)

#: Keys returned by :func:`volume_metrics`.
VOLUME_METRICS: tuple[str, ...] = (
    "dice",
    "jaccard",
    "rvd",
    "assd",
    "hd95",
    "hausdorff",
    "intersection",
    "pred_voxels",
    "target_voxels",
)


def _as_mask(name: str, arr: np.ndarray, ndim: int) -> np.ndarray:
    """Return ``arr`` as a bool array after checking rank and that it only holds 0/1."""
    arr = np.asarray(arr)
    if arr.ndim != ndim:
        raise ValueError(
            f"`{name}` has the wrong rank: expected a {ndim}D mask, got shape {arr.shape}. "
            f"Pass one {'slice (H, W)' if ndim == 2 else 'case (Z, Y, X)'} at a time."
        )
    if arr.dtype == np.bool_:
        return arr
    # Anything else must already be binarised: thresholding belongs to the caller.
    if not np.all((arr == 0) | (arr == 1)):
        bad = arr[~((arr == 0) | (arr == 1))].flat[0]
        raise ValueError(
            f"`{name}` is not a binary mask: expected values in {{0, 1}}, got {bad!r}. "
            "Threshold the probabilities (e.g. `prob > 0.5`) before computing metrics."
        )
    return arr.astype(bool)


def _check_same_shape(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` and `target` differ in shape: pred {pred.shape}, target {target.shape}. "
            "Resample the prediction onto the target grid first."
        )


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in spacing)
    except TypeError as err:
        raise ValueError(f"`spacing` must be a sequence of {ndim} numbers (mm), got {spacing!r}.") from err
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(
            f"`spacing` must be {ndim} finite positive numbers (mm, array-axis order), got {spacing!r}."
        )
    return values


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the foreground of ``mask``; None when it has none."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=others))
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a face neighbour in the background, the outside counting as background.

    The same as ``mask ^ binary_erosion(mask, cross, border_value=0)`` (MONAI/medpy), computed with
    two shifted ANDs per axis instead of scipy's generic erosion (several times faster on a
    129 x 512 x 512 volume).
    """
    interior = mask.copy()
    for axis in range(mask.ndim):
        head = [slice(None)] * mask.ndim
        tail = [slice(None)] * mask.ndim
        head[axis], tail[axis] = slice(1, None), slice(None, -1)
        interior[tuple(head)] &= mask[tuple(tail)]
        interior[tuple(tail)] &= mask[tuple(head)]
        head[axis], tail[axis] = 0, -1  # the first and last layers touch the outside
        interior[tuple(head)] = False
        interior[tuple(tail)] = False
    return mask & ~interior


def edt_threads() -> int:
    """Threads for the ``edt`` transforms: the CPUs this process may use, at most 8."""
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, min(8, os.cpu_count() or 1))


def directed_distances(query: np.ndarray, source: np.ndarray, sampling: Sequence[float]) -> np.ndarray:
    """Distance from every True pixel of ``query`` (C order) to the nearest True pixel of ``source``.

    The cost follows the query, not the array: the Euclidean distance transform of ``source`` is
    taken over the query's bounding box grown by a margin, and the margin doubles until every query
    pixel is at least as close to a source pixel inside that box as to the box's open faces (those
    not on the array's border). Then no source pixel outside the box can be nearer, and the
    distances equal those over the whole array. A compact query against a speckled source costs a
    small box; a speckled query costs one transform of the whole (already cropped) array.

    The transform is the ``edt`` package's (exact; float32 squared distances): exact integers for
    unit spacing, within about 1e-7 relative of scipy's float64 ``distance_transform_edt`` otherwise.

    Args:
        query, source: boolean arrays of one shape, both with foreground.
        sampling: pixel size per axis (mm or 1).

    Returns:
        float64 ``(query.sum(),)``.
    """
    shape = query.shape
    qbox, sbox = _bbox(query), _bbox(source)
    assert qbox is not None and sbox is not None
    step = np.asarray(sampling, dtype=np.float64)
    # Start at the gap between the two boxes (a smaller margin reaches no source pixel), or a few pixels.
    gap = np.array([max(s.start - q.stop + 1, q.start - s.stop + 1, 0) for q, s in zip(qbox, sbox)])
    margin = max(float(np.sqrt(np.sum((gap * step) ** 2))), 4.0 * float(step.max()))
    while True:
        grow = np.ceil(margin / step).astype(int)
        lo = np.array([max(0, q.start - g) for q, g in zip(qbox, grow)])
        hi = np.array([min(n, q.stop + g) for q, g, n in zip(qbox, grow, shape)])
        region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        whole = bool(np.all(lo == 0) and np.all(hi == np.asarray(shape)))
        squared = edt.edtsq(~source[region], anisotropy=tuple(float(s) for s in step), black_border=False,
                            parallel=edt_threads())
        inside = query[region]
        dist2 = squared[inside].astype(np.float64)
        if whole:
            break
        # Squared distance (float64) from each query pixel to the nearest open face's outer layer.
        idx = np.nonzero(inside)
        bound = np.full(dist2.shape, np.inf)
        for axis in range(query.ndim):
            if lo[axis] > 0:
                bound = np.minimum(bound, ((idx[axis] + 1) * step[axis]) ** 2)
            if hi[axis] < shape[axis]:
                bound = np.minimum(bound, ((hi[axis] - lo[axis] - idx[axis]) * step[axis]) ** 2)
        # A pixel outside is at least sqrt(bound) away; a tie gives the same distance. (dist2 carries
        # float32 rounding, so "no nearer" holds to that rounding, the transform's own precision.)
        if np.all(dist2 <= bound):
            break
        margin *= 2.0
    return np.sqrt(dist2)


def surface_distances(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two non-empty masks of any rank.

    Args:
        pred, target: boolean (or 0/1) masks of the same shape, both with foreground.
        spacing: pixel/voxel size per array axis (e.g. mm, ``(z, y, x)``); ``None`` = 1
            (distances in pixels).

    Returns:
        ``(d_pred_to_target, d_target_to_pred)``: 1D float64 arrays, one distance per surface
        pixel of ``pred`` (resp. ``target``) to the nearest surface pixel of the other mask.
    """
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    _check_same_shape(pred, target)
    if not pred.any() or not target.any():
        raise ValueError(
            "`pred` and `target` must both contain foreground for surface distances: "
            f"got {int(pred.sum())} and {int(target.sum())} foreground pixels. "
            "Empty masks are handled by slice_metrics/volume_metrics."
        )
    sampling = (1.0,) * pred.ndim if spacing is None else _check_spacing(spacing, pred.ndim)
    # Crop to the union's bounding box: all surface pixels lie inside it, so the nearest
    # surface pixel (and the erosion, outside being background) is the same as uncropped.
    box = _bbox(pred | target)
    pred_s, target_s = _surface(pred[box]), _surface(target[box])
    return directed_distances(pred_s, target_s, sampling), directed_distances(target_s, pred_s, sampling)


def _distance_metrics(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None, worst: float
) -> dict[str, float]:
    """Hausdorff, HD95 and ASSD with the empty-mask policy of the module docstring."""
    p_any, t_any = bool(pred.any()), bool(target.any())
    if not p_any and not t_any:
        return {"hausdorff": 0.0, "hd95": 0.0, "assd": 0.0}
    if not p_any or not t_any:
        return {"hausdorff": worst, "hd95": worst, "assd": worst}
    d_pt, d_tp = surface_distances(pred, target, spacing)
    return {
        "hausdorff": float(max(d_pt.max(), d_tp.max())),
        "hd95": float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))),
        "assd": float((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size)),
    }


def _overlap(tp: int, fp: int, fn: int) -> tuple[float, float]:
    """Dice and Jaccard; both 1 when both masks are empty (``tp + fp + fn == 0``)."""
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def slice_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Overlap and distance metrics of one 2D slice.

    Args:
        pred: predicted mask ``(H, W)``, bool or 0/1 of any numeric dtype.
        target: reference mask ``(H, W)``, same shape and encoding.

    Returns:
        ``{"dice", "jaccard", "precision", "recall", "specificity"}`` as fractions in
        ``[0, 1]`` and ``{"hausdorff", "hd95"}`` in pixels (see the module docstring for the
        definitions and the empty-mask policy). Per-slice F1 equals Dice under this policy,
        so it is not returned.

    Raises:
        ValueError: if either array is not 2D, the shapes differ, or a value is not 0/1.

    Example:
        >>> a = np.zeros((8, 8), bool); a[0:4, 0:4] = True
        >>> b = np.zeros((8, 8), bool); b[0:4, 2:6] = True
        >>> slice_metrics(a, b)["dice"], slice_metrics(a, b)["hausdorff"]
        (0.5, 2.0)
    """
    pred = _as_mask("pred", pred, 2)
    target = _as_mask("target", target, 2)
    _check_same_shape(pred, target)

    tp = int(np.count_nonzero(pred & target))
    n_pred = int(np.count_nonzero(pred))
    n_target = int(np.count_nonzero(target))
    fp, fn = n_pred - tp, n_target - tp
    tn = pred.size - tp - fp - fn

    dice, jaccard = _overlap(tp, fp, fn)
    # Precision of an empty prediction is 1 only when there was nothing to find; a missed
    # tumour counts as 0 (see module docstring). Recall of an empty target is 1.
    precision = tp / n_pred if n_pred else (1.0 if n_target == 0 else 0.0)
    recall = tp / n_target if n_target else 1.0
    specificity = tn / (tn + fp) if tn + fp else 1.0

    h, w = pred.shape
    dist = _distance_metrics(pred, target, None, worst=math.hypot(h, w))
    return {
        "dice": float(dice),
        "jaccard": float(jaccard),
        "precision": float(precision),
        "recall": float(recall),
        "specificity": float(specificity),
        "hausdorff": dist["hausdorff"],
        "hd95": dist["hd95"],
    }


def volume_metrics(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> dict[str, float | int]:
    """Per-case metrics of one 3D volume, distances in mm.

    Args:
        pred: predicted mask ``(Z, Y, X)``, bool or 0/1.
        target: reference mask ``(Z, Y, X)``, same shape.
        spacing: voxel size in mm in array-axis order ``(z, y, x)``, e.g. ``(2.5, 0.7, 0.7)``.

    Returns:
        ``dice``, ``jaccard`` (fractions), ``rvd`` (signed, ``(|P| - |T|) / |T|``), ``assd``,
        ``hd95``, ``hausdorff`` (mm) as floats, and the integer voxel counts
        ``intersection``, ``pred_voxels``, ``target_voxels`` for :func:`global_dice`.
        Empty masks follow the module docstring's policy (worst case = physical diagonal).

    Raises:
        ValueError: if either array is not 3D, the shapes differ, a value is not 0/1, or
            ``spacing`` is not three finite positive numbers.
    """
    pred = _as_mask("pred", pred, 3)
    target = _as_mask("target", target, 3)
    _check_same_shape(pred, target)
    sampling = _check_spacing(spacing, 3)

    tp = int(np.count_nonzero(pred & target))
    n_pred = int(np.count_nonzero(pred))
    n_target = int(np.count_nonzero(target))
    dice, jaccard = _overlap(tp, n_pred - tp, n_target - tp)
    if n_target:
        rvd = (n_pred - n_target) / n_target
    else:
        rvd = 0.0 if n_pred == 0 else math.inf

    worst = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, sampling)))
    dist = _distance_metrics(pred, target, sampling, worst=worst)
    return {
        "dice": float(dice),
        "jaccard": float(jaccard),
        "rvd": float(rvd),
        "assd": dist["assd"],
        "hd95": dist["hd95"],
        "hausdorff": dist["hausdorff"],
        "intersection": tp,
        "pred_voxels": n_pred,
        "target_voxels": n_target,
    }


def global_dice(per_case: Sequence[dict]) -> float:
    """LiTS "Dice global": ``2 * sum(intersection) / (sum(pred) + sum(target))`` over cases.

    Args:
        per_case: results of :func:`volume_metrics` (only the three count keys are read).

    Returns:
        The pooled Dice; 1.0 when every prediction and target is empty (as per-case Dice).

    Raises:
        ValueError: if ``per_case`` is empty or a result lacks a count key.
    """
    if len(per_case) == 0:
        raise ValueError("`per_case` is empty: expected at least one volume_metrics result.")
    sums = {"intersection": 0, "pred_voxels": 0, "target_voxels": 0}
    for i, res in enumerate(per_case):
        for key in sums:
            if key not in res:
                raise ValueError(
                    f"`per_case[{i}]` lacks {key!r}: expected a volume_metrics() result, "
                    f"got keys {sorted(res)}."
                )
            sums[key] += int(res[key])
    denom = sums["pred_voxels"] + sums["target_voxels"]
    return 1.0 if denom == 0 else 2 * sums["intersection"] / denom
