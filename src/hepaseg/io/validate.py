"""The checks every volume passes at read time, whatever its format.

:func:`check_volume` runs inside :func:`hepaseg.io.read_volume` on each reader's volume, before
it is brought to the canonical orientation (which needs an invertible affine) and before any
command does work with it. It refuses (one line naming the file):

* NaN or infinite voxels (with their count): they would be written into prepared shards and
  make training diverge, or poison the window of a prediction;
* a spacing that is zero, negative or not finite: lesion volumes in mL and distances in mm
  would be wrong. NIfTI headers are checked as stored: nibabel silently turns a zero
  ``pixdim`` into 1 mm when it loads a file, so the raw header is read again here;
* a voxel-to-world affine that is not finite or is singular: masks could not be written back
  in the source's geometry, nor lesion centroids placed in mm.

A spacing that a reader documents as nominal (the MRC sample's 1 mm, recorded in
``volume.meta["spacing_note"]``) is a valid spacing and passes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from hepaseg.errors import HepasegError
from hepaseg.io.volume import Volume

__all__ = ["check_volume"]

#: An affine whose smallest singular value is below this fraction of its largest is singular.
SINGULAR_RATIO = 1e-6


def check_volume(volume: Volume, image_file: str | os.PathLike | None = None) -> Volume:
    """Refuse a volume with non-finite voxels, a bad spacing or a singular affine; return it unchanged.

    Args:
        volume: a freshly read :class:`Volume` (image ``(z, y, x)`` in HU, spacing in mm ``(z, y, x)``,
            4 x 4 affine for index order ``(x, y, z)``).
        image_file: the file (or DICOM folder) the image came from, named in messages; a NIfTI
            file's header ``pixdim`` is also checked as stored. Default ``volume.source``.

    Raises:
        HepasegError: ``"<file>: <problem>: expected ..., got .... <fix>"``.
    """
    where = str(image_file if image_file is not None else volume.source or volume.case_id)
    image = np.asarray(volume.image)
    # One float64 sum is cheap and catches NaN and inf; only then count them.
    if image.size and not np.isfinite(image.sum(dtype=np.float64)):
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        if bad:
            raise HepasegError(
                f"{where}: image holds {bad} NaN/inf voxel(s) of {image.size}: expected finite CT values in HU. "
                "Fix or re-export the scan"
            )
    if image_file is not None and str(image_file).lower().endswith((".nii", ".nii.gz")):
        pixdim = _stored_pixdim(Path(image_file))
        if pixdim is not None and not all(np.isfinite(v) and v != 0 for v in pixdim):
            shown = ", ".join(f"{v:g}" for v in pixdim)
            raise HepasegError(
                f"{where}: header voxel size pixdim (x, y, z) = ({shown}): expected three finite non-zero sizes "
                "in mm (a zero would be read as 1 mm and make every volume in mL and distance in mm wrong). "
                "Set the true voxel size in the header or re-export the scan"
            )
    spacing = tuple(float(s) for s in volume.spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        shown = ", ".join(f"{s:g}" for s in spacing)
        raise HepasegError(
            f"{where}: voxel spacing (z, y, x) = ({shown}) mm: expected three finite spacings > 0 mm. "
            "Fix the voxel size in the file's header (NIfTI pixdim, DICOM PixelSpacing and slice positions)"
        )
    affine = np.asarray(volume.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise HepasegError(
            f"{where}: voxel-to-world affine is not a finite 4 x 4 matrix: expected finite numbers, got "
            f"{np.array2string(affine, separator=',').replace(chr(10), '')}. Fix the orientation in the header "
            "(NIfTI sform/qform, DICOM ImageOrientationPatient/ImagePositionPatient)"
        )
    singular = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if singular[0] == 0 or singular[-1] < SINGULAR_RATIO * singular[0]:
        rows = "; ".join(", ".join(f"{v:g}" for v in row) for row in affine[:3, :3])
        raise HepasegError(
            f"{where}: voxel-to-world affine is singular (3 x 3 part [{rows}]): expected three independent voxel "
            "axes with non-zero lengths in mm. Fix the orientation in the header (NIfTI sform/qform, DICOM "
            "ImageOrientationPatient)"
        )
    return volume


def _stored_pixdim(path: Path) -> tuple[float, float, float] | None:
    """``pixdim[1:4]`` exactly as stored in a NIfTI-1/2 header (nibabel's loader repairs zeros to 1)."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as fh:
            raw = fh.read(540)
    except (OSError, EOFError):
        return None  # unreadable: the reader has already reported it (or read it some other way)
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        size = klass.template_dtype.itemsize
        if len(raw) < size:
            continue
        try:
            header = klass.from_fileobj(io.BytesIO(raw[:size]), check=False)
        except Exception:  # noqa: BLE001 -- nibabel raises several types for the wrong header class
            continue
        if int(header["sizeof_hdr"]) == size:
            return tuple(float(v) for v in header["pixdim"][1:4])
    return None
