"""The :class:`Volume` every reader returns and every writer consumes.

Axis order is fixed (as in nnU-Net's reader contract): arrays are ``(z, y, x)``
with ``z`` the axial slice index, and ``spacing`` is in mm in the same order.
``affine`` is the 4 x 4 NIfTI (RAS+) affine that maps a voxel index in NIfTI
order ``(i, j, k) = (x, y, z)`` to world mm; writing a mask back with it makes
the mask overlay the source in ITK-SNAP or 3D Slicer (for DICOM sources the
affine is built from ImagePositionPatient / ImageOrientationPatient and
converted from DICOM's LPS to RAS).

:func:`~hepaseg.io.read_volume` returns every volume in the canonical orientation of
:mod:`hepaseg.io.orientation` (rows anterior->posterior, columns the patient's right->left,
slices inferior->superior); ``source_geometry`` records the source's own voxel order so
that :meth:`Volume.to_source` and the writers put masks back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hepaseg.io.orientation import SourceGeometry

__all__ = ["Volume", "LABEL_BACKGROUND", "LABEL_LIVER", "LABEL_TUMOR"]

LABEL_BACKGROUND = 0
LABEL_LIVER = 1
LABEL_TUMOR = 2


@dataclass
class Volume:
    """One CT volume, optionally with its LiTS-convention label map.

    Attributes:
        image: float32 array ``(z, y, x)`` in Hounsfield units.
        spacing: voxel size in mm, ``(z, y, x)``.
        affine: 4 x 4 float64 NIfTI/RAS affine for index order ``(x, y, z)``.
        label: uint8 array ``(z, y, x)`` with {0 background, 1 liver, 2 tumour},
            or ``None`` when the source has no labels.
        case_id: short identifier (``"lits-117"``, ``"ircadb-1.1"``, ``"liver_3"``...).
        source: the path the volume was read from (as given by the user).
        kind: reader that produced it: ``lits``, ``msd``, ``ircadb``, ``nifti``,
            ``dicom``, ``mrc`` or ``phantom``.
        meta: free-form provenance notes (e.g. ``{"spacing_note": "nominal 1 mm"}``).
        source_geometry: the reader's own voxel order and affine when the arrays were
            reoriented to the canonical orientation (``None``: the arrays are the source's).
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    label: np.ndarray | None = None
    case_id: str = "case"
    source: str = ""
    kind: str = "nifti"
    meta: dict = field(default_factory=dict)
    source_geometry: SourceGeometry | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def has_label(self) -> bool:
        return self.label is not None

    def to_source(self, array_zyx: np.ndarray) -> np.ndarray:
        """A ``(z, y, x)`` array on this volume's grid, in the source's own voxel order.

        The identity when the volume was not reoriented (``source_geometry`` is ``None``).
        """
        array_zyx = np.asarray(array_zyx)
        if array_zyx.shape != self.shape:
            raise ValueError(f"array shape {array_zyx.shape} is not the volume's {self.shape}")
        if self.source_geometry is None:
            return array_zyx
        return self.source_geometry.to_source(array_zyx)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm^3)."""
        return float(np.prod(self.spacing)) / 1000.0
