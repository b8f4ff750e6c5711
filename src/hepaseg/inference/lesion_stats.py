"""How sure the prediction is about each lesion, and where it lies against the liver.

:func:`lesion_confidence` adds, to every lesion of :func:`hepaseg.inference.lesion_table` (the
same 26-connected components, in the same order: largest first, ties in raster order of their
first voxel), the columns of :data:`LESION_CONFIDENCE_COLUMNS`:

* ``mean_probability``, ``max_probability``: of the (ensemble mean) tumour probability over the
  lesion's voxels;
* ``mean_uncertainty``: mean over the lesion's voxels of the sd over members and flips
  (:mod:`hepaseg.inference.ensemble`; 0 for one member without TTA);
* ``member_agreement``: the share of ensemble members whose own mask (member probability
  > threshold) overlaps the lesion (1.0 = every member found it; a lesion of the mean always
  has at least one member, since a mean above the threshold needs one member above it);
* ``liver_fraction``: the share of the lesion's voxels inside the liver mask;
* ``liver_surface_distance_mm``: the smallest distance (mm, voxel centre to voxel centre, in
  the scan's spacing) from a lesion voxel to the liver's surface. The surface is the layer of
  liver voxels with a 6-neighbour outside the liver, after filling the liver's enclosed
  cavities (a tumour the liver stage left out must not make a surface inside the liver). So 0
  for a lesion that reaches the surface, the depth of its shallowest voxel for a lesion inside,
  the gap for a lesion outside (``liver_fraction`` tells which).

Without a probability, uncertainty, member votes or liver the matching columns are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from hepaseg.evaluation.detection import label_lesions_cropped
from hepaseg.evaluation.metrics import directed_distances

__all__ = ["LESION_CONFIDENCE_COLUMNS", "lesion_confidence"]

LESION_CONFIDENCE_COLUMNS = [
    "mean_probability",
    "max_probability",
    "mean_uncertainty",
    "member_agreement",
    "liver_fraction",
    "liver_surface_distance_mm",
]

_FACES = ndimage.generate_binary_structure(3, 1)

#: ``(labels, n, box)`` of :func:`hepaseg.evaluation.detection.label_lesions_cropped`.
Components = tuple[np.ndarray, int, tuple[slice, ...]]


def _bbox(mask: np.ndarray, grow: int = 0) -> tuple[slice, slice, slice] | None:
    ranges = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        ranges.append(slice(max(int(hit[0]) - grow, 0), min(int(hit[-1]) + 1 + grow, mask.shape[axis])))
    return tuple(ranges)  # type: ignore[return-value]


def _liver_surface_distances(lesion_voxels: np.ndarray, box: tuple[slice, ...], liver: np.ndarray,
                             spacing: Sequence[float]) -> np.ndarray | None:
    """Distance (mm) from every lesion voxel (``lesion_voxels``, boolean in ``box``; C order) to the liver surface.

    The liver's cavities are filled and its surface found in the liver's own box grown by one voxel
    (every hole and every surface voxel lies inside it); the distances come from
    :func:`~hepaseg.evaluation.metrics.directed_distances`, whose transform covers only the lesions'
    box grown until no surface voxel outside can be nearer. None when there is no liver.
    """
    liver_box = _bbox(liver, grow=1)
    if liver_box is None:
        return None
    filled = ndimage.binary_fill_holes(liver[liver_box])
    # border_value=0: beyond the scan counts as outside the liver, as it would in the full volume.
    surface = filled & ~ndimage.binary_erosion(filled, structure=_FACES, border_value=0)
    union = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(liver_box, box))
    query = np.zeros([u.stop - u.start for u in union], dtype=bool)
    source = np.zeros_like(query)
    query[tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, union))] = lesion_voxels
    source[tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(liver_box, union))] = surface
    # Raster (z, y, x) order of the voxels, as lesion_voxels lists them: the offset changes no order.
    return directed_distances(query, source, tuple(float(s) for s in spacing))


def lesion_confidence(
    mask: np.ndarray,
    spacing: Sequence[float],
    *,
    probability: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    votes: np.ndarray | None = None,
    n_members: int = 1,
    liver: np.ndarray | None = None,
    components: Components | None = None,
) -> list[dict[str, float | int]]:
    """The columns of :data:`LESION_CONFIDENCE_COLUMNS` for every lesion of ``mask`` (module docstring).

    Args:
        mask: ``(z, y, x)`` tumour mask (nonzero = tumour), as passed to ``lesion_table``.
        spacing: voxel size in mm ``(z, y, x)``.
        probability: float ``(z, y, x)`` tumour probability.
        uncertainty: float ``(z, y, x)`` sd over members and flips.
        votes: unsigned ``(z, y, x)`` bit field, bit m = member m predicts the voxel.
        n_members: number of members (bits of ``votes``), >= 1.
        liver: ``(z, y, x)`` liver mask (nonzero = liver).
        components: ``mask``'s 26-connected components as
            :func:`~hepaseg.evaluation.detection.label_lesions_cropped` returns them, when the caller
            has them already (``lesion_table`` takes the same); labelled here otherwise.

    One member needs no ``votes``: its agreement is 1 with every lesion of its own mask.

    Every per-lesion value is reduced over the lesion voxels only (sorted by label once), never over
    the whole bounding box: a speckled prediction of 10^4 lesions costs about what one of its
    transforms costs.

    Returns:
        One dict per lesion, in ``lesion_table`` order, with ``voxels`` (to match the rows) and
        the columns above (floats; NaN where an input is missing).
    """
    labels, n, box = components if components is not None else label_lesions_cropped(mask)
    if n == 0:
        return []
    at = np.flatnonzero(labels)  # (n_voxels,) raster index in the box of every lesion voxel
    flat = labels.ravel()[at]  # their labels
    voxels = np.bincount(flat, minlength=n + 1)[1:]
    # Voxels grouped by label (stable radix sort for cc3d's 16-bit labels): reduceat over the groups.
    order = np.argsort(flat, kind="stable")
    starts = np.r_[0, np.cumsum(voxels)[:-1]]
    nan = np.full(n, math.nan)

    def at_lesions(values: np.ndarray) -> np.ndarray:
        return np.asarray(values[box]).ravel()[at]  # a view when the box is the whole volume

    def mean_of(values: np.ndarray | None) -> np.ndarray:
        if values is None:
            return nan
        return np.bincount(flat, weights=at_lesions(values).astype(np.float64), minlength=n + 1)[1:] / voxels

    mean_p = mean_of(probability)
    max_p = nan
    if probability is not None:
        max_p = np.maximum.reduceat(at_lesions(probability)[order], starts).astype(np.float64)
    mean_u = mean_of(uncertainty)
    agreement = np.ones(n) if votes is None and int(n_members) == 1 else nan  # one member: its own lesions
    if votes is not None:
        found = np.zeros(n)
        member_votes = at_lesions(votes)
        for m in range(int(n_members)):
            member = (member_votes >> member_votes.dtype.type(m)) & 1
            found += np.bincount(flat[member == 1], minlength=n + 1)[1:] > 0
        agreement = found / int(n_members)
    fraction, distance = nan, nan
    if liver is not None:
        liver = np.asarray(liver) != 0
        fraction = np.bincount(flat[at_lesions(liver)], minlength=n + 1)[1:] / voxels
        per_voxel = _liver_surface_distances(labels != 0, box, liver, spacing)
        if per_voxel is not None:
            distance = np.minimum.reduceat(per_voxel[order], starts)

    rows = [
        {"voxels": int(voxels[i]), "mean_probability": float(mean_p[i]), "max_probability": float(max_p[i]),
         "mean_uncertainty": float(mean_u[i]), "member_agreement": float(agreement[i]),
         "liver_fraction": float(fraction[i]), "liver_surface_distance_mm": float(distance[i])}
        for i in range(n)
    ]
    # lesion_table's order: largest first; the sort is stable, so ties keep the raster order of labels.
    order = sorted(range(n), key=lambda i: -rows[i]["voxels"])
    return [rows[i] for i in order]
