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

from hepaseg.inference.postprocess import component_labels

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


def _bbox(mask: np.ndarray, grow: int = 0) -> tuple[slice, slice, slice] | None:
    ranges = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        ranges.append(slice(max(int(hit[0]) - grow, 0), min(int(hit[-1]) + 1 + grow, mask.shape[axis])))
    return tuple(ranges)  # type: ignore[return-value]


def _surface_distance(labels: np.ndarray, box: tuple[slice, ...], n: int, liver: np.ndarray,
                      spacing: Sequence[float]) -> np.ndarray:
    """Per label 1..n of ``labels`` (the lesions' bounding ``box``): min distance (mm) to the liver surface.

    Computed in the box around the liver and the lesions grown by one voxel, which holds every
    surface voxel and every lesion voxel (so the distances are those of the whole volume).
    """
    liver_box = _bbox(liver)
    if liver_box is None:
        return np.full(n, math.nan)
    big = tuple(slice(max(min(a.start, b.start) - 1, 0), min(max(a.stop, b.stop) + 1, size))
                for a, b, size in zip(liver_box, box, liver.shape))
    filled = ndimage.binary_fill_holes(liver[big])
    # border_value=0: beyond the scan counts as outside the liver, as it would in the full volume.
    surface = filled & ~ndimage.binary_erosion(filled, structure=_FACES, border_value=0)
    distance = ndimage.distance_transform_edt(~surface, sampling=[float(s) for s in spacing])
    inner = tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, big))
    return np.asarray(ndimage.minimum(distance[inner], labels, np.arange(1, n + 1)), dtype=np.float64)


def lesion_confidence(
    mask: np.ndarray,
    spacing: Sequence[float],
    *,
    probability: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    votes: np.ndarray | None = None,
    n_members: int = 1,
    liver: np.ndarray | None = None,
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

    One member needs no ``votes``: its agreement is 1 with every lesion of its own mask.

    Returns:
        One dict per lesion, in ``lesion_table`` order, with ``voxels`` (to match the rows) and
        the columns above (floats; NaN where an input is missing).
    """
    mask = np.asarray(mask) != 0
    box = _bbox(mask)
    if box is None:
        return []
    labels, n = component_labels(mask[box])  # the same components and numbering as in the whole volume
    index = np.arange(1, n + 1)
    flat = labels.ravel()
    voxels = np.bincount(flat, minlength=n + 1)[1:]
    nan = np.full(n, math.nan)

    def mean_of(values: np.ndarray | None) -> np.ndarray:
        if values is None:
            return nan
        return np.bincount(flat, weights=np.asarray(values[box], np.float64).ravel(), minlength=n + 1)[1:] / voxels

    mean_p = mean_of(probability)
    max_p = nan if probability is None else np.asarray(ndimage.maximum(probability[box], labels, index), np.float64)
    mean_u = mean_of(uncertainty)
    agreement = np.ones(n) if votes is None and int(n_members) == 1 else nan  # one member: its own lesions
    if votes is not None:
        found = np.zeros(n)
        crop = np.asarray(votes[box])
        for m in range(int(n_members)):
            member = (crop >> crop.dtype.type(m)) & 1
            found += np.bincount(flat[member.ravel() == 1], minlength=n + 1)[1:] > 0
        agreement = found / int(n_members)
    fraction, distance = nan, nan
    if liver is not None:
        liver = np.asarray(liver) != 0
        fraction = np.bincount(flat[liver[box].ravel()], minlength=n + 1)[1:] / voxels
        distance = _surface_distance(labels, box, n, liver, spacing)

    rows = [
        {"voxels": int(voxels[i]), "mean_probability": float(mean_p[i]), "max_probability": float(max_p[i]),
         "mean_uncertainty": float(mean_u[i]), "member_agreement": float(agreement[i]),
         "liver_fraction": float(fraction[i]), "liver_surface_distance_mm": float(distance[i])}
        for i in range(n)
    ]
    # lesion_table's order: largest first; the sort is stable, so ties keep the raster order of labels.
    order = sorted(range(n), key=lambda i: -rows[i]["voxels"])
    return [rows[i] for i in order]
