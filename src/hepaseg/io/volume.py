"""The :class:`Volume` every reader returns and every writer consumes.

Axis order is fixed (as in nnU-Net's reader contract): arrays are ``(z, y, x)``
with ``z`` the axial slice index, and ``spacing`` is in mm in the same order.
``affine`` is the 4 x 4 NIfTI (RAS+) affine that maps a voxel index in NIfTI
order ``(i, j, k) = (x, y, z)`` to world mm; writing a mask back with it makes
the mask overlay the source in ITK-SNAP or 3D Slicer (for DICOM sources the
affine is built from ImagePositionPatient / ImageOrientationPatient and
converted from DICOM's LPS to RAS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    label: np.ndarray | None = None
    case_id: str = "case"
    source: str = ""
    kind: str = "nifti"
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def has_label(self) -> bool:
        return self.label is not None

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm^3)."""
        return float(np.prod(self.spacing)) / 1000.0
