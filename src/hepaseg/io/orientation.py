"""One in-plane orientation for every source, and the way back to the source's voxel order.

A 2D network must see every axial slice in the same anatomical orientation, whatever
the file's affine (LiTS volumes differ from one another and some are flipped), DICOM's
own LPS order or an MRC without any geometry. :func:`to_canonical` brings a volume to

    **array (z, y, x): z inferior -> superior, y (rows) anterior -> posterior,
    x (columns) the patient's right -> left**

i.e. the radiological display that DICOM viewers use for axial CT (the liver on the
image's left, the spine at the bottom). For NIfTI's index order ``(i, j, k) = (x, y, z)``
these are the axis codes ``("L", "P", "S")`` (:data:`CANONICAL_AXCODES`); a standard
axial DICOM series (ImageOrientationPatient ``[1,0,0,0,1,0]``, slices sorted by position)
is already canonical.

Only axis permutations and flips are applied (nibabel's ``io_orientation``: each voxel
axis goes to the world axis it is closest to), so no voxel is interpolated. An
**oblique** affine (a tilted gantry, a rotated acquisition) is brought to its *closest*
canonical orientation: the voxels keep their grid, the affine keeps the exact geometry,
and the network sees slices up to that obliquity (a few degrees in practice).

:class:`SourceGeometry` records what the reader produced, so that a mask computed on the
canonical array goes back to the source's exact voxel order and affine
(:meth:`SourceGeometry.to_source`), and a NIfTI source keeps its sform/qform and codes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

if TYPE_CHECKING:
    from hepaseg.io.volume import Volume

__all__ = [
    "CANONICAL_AXCODES",
    "CANONICAL_DESCRIPTION",
    "SourceGeometry",
    "axcodes_of",
    "to_canonical",
]

#: NIfTI axis codes of the canonical orientation for index order (x, y, z).
CANONICAL_AXCODES: tuple[str, str, str] = ("L", "P", "S")
#: The same in words, as recorded in manifests and checkpoints.
CANONICAL_DESCRIPTION = "LPS: slices inferior->superior, rows anterior->posterior, columns patient right->left"

_CANONICAL_ORNT = axcodes2ornt(CANONICAL_AXCODES)


def axcodes_of(affine: np.ndarray) -> str:
    """Closest axis codes of a RAS affine for index order (x, y, z), e.g. ``"LPS"`` or ``"RAS"``."""
    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


@dataclass(frozen=True)
class SourceGeometry:
    """Where a canonical volume came from: enough to put an array back exactly.

    Attributes:
        shape: the reader's array shape ``(z, y, x)`` before reorientation.
        affine: the reader's 4 x 4 RAS affine for index order ``(x, y, z)``.
        axcodes: the closest axis codes of ``affine`` (``"RAS"``, ``"LPS"``, ...).
        to_canonical_ornt: nibabel orientation transform (3 x 2) from the source's
            ``(x, y, z)`` index axes to the canonical ones.
        oblique_deg: the largest angle (degrees) between a voxel axis and the world axis
            it was assigned to; 0 for an axis-aligned affine.
        nifti_header: for NIfTI sources, ``{"sform": 4x4, "sform_code": int, "qform": 4x4,
            "qform_code": int}`` as stored in the file, so that masks keep them; else ``None``.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    axcodes: str
    to_canonical_ornt: np.ndarray
    oblique_deg: float = 0.0
    nifti_header: dict | None = None

    @property
    def is_identity(self) -> bool:
        """True when the source already is canonical (no axis was permuted or flipped)."""
        return bool(np.array_equal(self.to_canonical_ornt, [[0, 1], [1, 1], [2, 1]]))

    def to_source(self, array_zyx: np.ndarray) -> np.ndarray:
        """Map a canonical ``(z, y, x)`` array back to the source's ``(z, y, x)`` voxel order.

        Works for any array on the volume's grid (a mask, probabilities); the result is a
        C-contiguous array of the same dtype with shape :attr:`shape`.
        """
        if self.is_identity:
            return np.ascontiguousarray(array_zyx)
        back = ornt_transform(_CANONICAL_ORNT, self.to_canonical_ornt_source)
        xyz = apply_orientation(np.asarray(array_zyx).transpose(2, 1, 0), back)
        out = np.ascontiguousarray(xyz.transpose(2, 1, 0))
        assert out.shape == tuple(self.shape), (out.shape, self.shape)
        return out

    @property
    def to_canonical_ornt_source(self) -> np.ndarray:
        """The source's own orientation (nibabel ``ornt``: index axis -> world axis, sign)."""
        return io_orientation(self.affine)

    def as_dict(self) -> dict:
        """JSON-friendly summary (for manifests and prediction metadata)."""
        return {
            "source_axcodes": self.axcodes,
            "reoriented": not self.is_identity,
            "oblique_deg": round(self.oblique_deg, 3),
        }


def _obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle between a voxel axis and its closest world axis (degrees)."""
    rzs = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(rzs, axis=0)
    if np.any(norms == 0):
        return 0.0
    cosines = np.abs(rzs / norms).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())


def to_canonical(volume: Volume, *, nifti_header: dict | None = None) -> Volume:
    """Return ``volume`` in the canonical orientation, with its :class:`SourceGeometry`.

    Args:
        volume: as a reader produced it: image/label ``(z, y, x)``, spacing ``(z, y, x)`` mm,
            RAS affine for index order ``(x, y, z)``.
        nifti_header: the source file's sform/qform and codes (NIfTI readers), kept so
            that masks written back carry them.

    Returns:
        A new :class:`Volume` whose arrays are permuted/flipped views made contiguous,
        whose affine describes the same anatomy for the new voxel order, whose spacing
        follows the new axes, and whose ``source_geometry`` maps back.
    """
    affine = np.asarray(volume.affine, dtype=np.float64)
    source_ornt = io_orientation(affine)
    transform = ornt_transform(source_ornt, _CANONICAL_ORNT)
    geometry = SourceGeometry(
        shape=volume.shape,
        affine=affine.copy(),
        axcodes=axcodes_of(affine),
        to_canonical_ornt=transform,
        oblique_deg=_obliquity_deg(affine),
        nifti_header=nifti_header,
    )
    if geometry.is_identity:
        return replace(volume, source_geometry=geometry)

    shape_xyz = volume.shape[::-1]

    def reorient(array_zyx: np.ndarray) -> np.ndarray:
        xyz = apply_orientation(array_zyx.transpose(2, 1, 0), transform)
        return np.ascontiguousarray(xyz.transpose(2, 1, 0))

    new_affine = affine @ inv_ornt_aff(transform, shape_xyz)
    spacing_xyz = np.asarray(volume.spacing[::-1], dtype=np.float64)
    new_spacing_xyz = spacing_xyz[transform[:, 0].argsort()]  # new axis j comes from old axis with target j
    spacing_zyx = tuple(float(s) for s in new_spacing_xyz[::-1])
    return replace(
        volume,
        image=reorient(volume.image),
        label=None if volume.label is None else reorient(volume.label),
        affine=new_affine,
        spacing=spacing_zyx,  # type: ignore[arg-type]
        source_geometry=geometry,
    )
