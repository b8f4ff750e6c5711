"""NIfTI reading and writing with nibabel, in hepaseg's ``(z, y, x)`` convention.

NIfTI stores voxels in index order ``(i, j, k) = (x, y, z)`` with a 4 x 4 affine
to RAS+ world mm. :func:`load_nifti` keeps the file's own affine (nibabel's
``img.affine``: the sform when set, else the qform) and voxel order; the array is only
transposed to ``(z, y, x)`` and the spacing (header zooms) reordered to match.
:func:`~hepaseg.io.read_volume` then brings the volume to the canonical orientation
(:mod:`hepaseg.io.orientation`), and the writers here put a mask back in the source's
exact geometry: voxel order, affine, and the sform/qform with their codes.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from hepaseg.errors import HepasegError
from hepaseg.io.atomic import atomic_path
from hepaseg.io.volume import Volume

__all__ = [
    "NIFTI_SUFFIXES",
    "check_label_values",
    "is_nifti_path",
    "load_nifti",
    "nifti_header_geometry",
    "nifti_stem",
    "write_image_nifti",
    "write_label_nifti",
    "write_probability_nifti",
    "PROBABILITY_STEP",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")

# What nibabel / gzip / numpy raise on a truncated or corrupt file.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii`` / ``.nii.gz`` (``volume-3.nii.gz`` -> ``volume-3``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_nifti(
    path: str | os.PathLike, *, what: str = "image"
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a 3D NIfTI file without reorienting it.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        what: ``"image"`` returns float32 (scl_slope/inter applied, i.e. HU for CT);
            ``"label"`` returns the stored values in their on-disk dtype (checked
            later by :func:`check_label_values`).

    Returns:
        ``(array, spacing, affine)``: array ``(z, y, x)`` (C-contiguous), spacing in
        mm ``(z, y, x)`` from the header zooms, and the file's 4 x 4 float64 RAS
        affine for index order ``(x, y, z)``.

    Raises:
        HepasegError: unreadable/truncated file, not 3D (a 4D file is accepted only
            with a singleton 4th axis), or a single slice.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise HepasegError(
                f"{path}: not a NIfTI image: expected NIfTI-1/2, got {type(img).__name__}. "
                "Convert it to .nii.gz first."
            )
        # nibabel reads lazily: truncation only shows when the voxels are read.
        if what == "image":
            data = img.get_fdata(dtype=np.float32)
        else:
            data = np.asanyarray(img.dataobj)
    except HepasegError:
        raise
    except _READ_ERRORS as exc:
        raise HepasegError(
            f"{path}: cannot read NIfTI (truncated or corrupt?): {type(exc).__name__}: {_first_line(exc)}. "
            "Re-download or re-export the file."
        ) from None

    zooms = tuple(float(z) for z in img.header.get_zooms())
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]  # (x, y, z, 1): a 3D volume saved with a time axis of length 1
    if data.ndim != 3:
        raise HepasegError(
            f"{path}: {what} has {data.ndim} dimensions {tuple(data.shape)}: expected a 3D volume "
            "(x, y, z) or 4D with a singleton 4th axis. Split multi-volume files first."
        )
    if data.shape[2] < 2:
        raise HepasegError(
            f"{path}: {what} is a single 2D slice {tuple(data.shape)}: expected a 3D volume with at "
            "least 2 slices. Pass the whole scan, not one slice."
        )
    spacing = (zooms[2], zooms[1], zooms[0])  # header zooms are (x, y, z): reorder to (z, y, x)
    array = np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (z, y, x)
    return array, spacing, np.asarray(img.affine, dtype=np.float64)


def nifti_header_geometry(path: str | os.PathLike) -> dict:
    """The file's sform and qform with their codes (header only, no voxels read).

    Returns:
        ``{"sform": 4x4, "sform_code": int, "qform": 4x4, "qform_code": int}`` (float64).
    """
    header = nib.load(str(path)).header
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    return {
        "sform": None if sform is None else np.asarray(sform, dtype=np.float64),
        "sform_code": int(sform_code),
        "qform": None if qform is None else np.asarray(qform, dtype=np.float64),
        "qform_code": int(qform_code),
    }


def check_label_values(label: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Return ``label`` as uint8 after checking it only holds {0, 1, 2}.

    Raises:
        HepasegError: naming ``path`` and (up to 5 of) the unexpected values.
    """
    if np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_:
        # Fast path for the usual on-disk uint8/int16 labels: a range check is enough.
        ok = label.size == 0 or (label.min() >= 0 and label.max() <= 2)
    else:
        ok = bool(np.isin(label, (0, 1, 2)).all())
    if not ok:
        bad = np.unique(label[~np.isin(label, (0, 1, 2))])
        shown = ", ".join(f"{v:g}" for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise HepasegError(
            f"{path}: label values outside {{0, 1, 2}}: expected 0 background, 1 liver, 2 tumour, "
            f"got {shown}. Check that this is a LiTS-style liver/tumour segmentation."
        )
    return label.astype(np.uint8, copy=False)


def write_label_nifti(mask: np.ndarray, reference: Volume, path: str | os.PathLike) -> Path:
    """Write a ``(z, y, x)`` mask as a uint8 NIfTI in ``reference``'s source geometry.

    The mask (on ``reference``'s canonical grid) goes back to the source's voxel order
    (:meth:`Volume.to_source`) and is saved with the source's affine; a NIfTI source keeps
    its own sform/qform and codes, other sources get code 1 (scanner). So the mask
    overlays the source CT voxel for voxel in ITK-SNAP / 3D Slicer. Written atomically.

    Args:
        mask: integer or bool array ``(z, y, x)`` with values 0..255 (e.g. 0/1 tumour
            or 0/1/2 liver/tumour), same shape as ``reference.image`` (canonical order).
        reference: the volume the mask was computed on.
        path: destination ending in ``.nii.gz`` (or ``.nii``).

    Returns:
        ``Path(path)``.
    """
    mask = np.asarray(mask)
    if mask.shape != reference.shape:
        raise HepasegError(
            f"{path}: mask shape mismatch: expected {reference.shape} (z, y, x) like {reference.case_id}, "
            f"got {tuple(mask.shape)}. Resample the mask back to the source grid before writing."
        )
    if (
        mask.dtype != np.bool_
        and mask.size
        and (
            mask.min() < 0
            or mask.max() > 255
            or (not np.issubdtype(mask.dtype, np.integer) and not np.all(mask == np.rint(mask)))
        )
    ):
        raise HepasegError(
            f"{path}: mask values do not fit uint8: expected integers 0..255, got range "
            f"{mask.min():g}..{mask.max():g}. Threshold or argmax the prediction first."
        )
    return _write_in_source_geometry(mask.astype(np.uint8), reference, path)


def write_image_nifti(volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``volume.image`` (float32 HU, ``(z, y, x)``) as NIfTI in its source geometry, atomically."""
    return _write_in_source_geometry(np.asarray(volume.image, dtype=np.float32), volume, path)


def write_array_nifti(array_zyx: np.ndarray, reference: Volume, path: str | os.PathLike) -> Path:
    """Write any array on ``reference``'s canonical grid (e.g. float16 probabilities) in its source geometry."""
    array_zyx = np.asarray(array_zyx)
    if array_zyx.shape != reference.shape:
        raise HepasegError(
            f"{path}: array shape mismatch: expected {reference.shape} (z, y, x) like {reference.case_id}, "
            f"got {tuple(array_zyx.shape)}. Resample the array back to the source grid before writing."
        )
    return _write_in_source_geometry(array_zyx, reference, path)


#: Probabilities are stored as uint16 counts of this step (NIfTI ``scl_slope``): see write_probability_nifti.
PROBABILITY_STEP = 1.0 / 65535.0


def write_probability_nifti(probability_zyx: np.ndarray, reference: Volume, path: str | os.PathLike) -> Path:
    """Write values in [0, 1] (probabilities, uncertainties) on ``reference``'s canonical grid, 2 bytes a voxel.

    NIfTI-1 and -2 define no 16-bit float type (nibabel refuses float16), so the values are
    stored as uint16 ``round(p * 65535)`` with ``scl_slope = 1/65535`` and ``scl_inter = 0``:
    every reader that applies the slope (nibabel ``get_fdata``, SimpleITK, ITK-SNAP, 3D Slicer)
    gets float probabilities back, exact to ``1/131070`` everywhere on [0, 1] (float16 would be
    exact only to ``2.4e-4`` near 1), in the source's exact geometry (as :func:`write_label_nifti`).

    Args:
        probability_zyx: float ``(z, y, x)`` in [0, 1], the shape of ``reference`` (canonical order).
        reference: the volume the values were computed on.
        path: destination ending in ``.nii.gz`` (or ``.nii``); written atomically.
    """
    values = np.asarray(probability_zyx)
    if values.shape != reference.shape:
        raise HepasegError(
            f"{path}: array shape mismatch: expected {reference.shape} (z, y, x) like {reference.case_id}, "
            f"got {tuple(values.shape)}. Resample the array back to the source grid before writing."
        )
    if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
        raise HepasegError(f"{path}: values outside [0, 1]: expected probabilities, got range "
                           f"{np.nanmin(values):g}..{np.nanmax(values):g}")
    counts = np.rint(values.astype(np.float64) / PROBABILITY_STEP).astype(np.uint16)
    return _write_in_source_geometry(counts, reference, path, slope=PROBABILITY_STEP)


def _write_in_source_geometry(
    array_zyx: np.ndarray, reference: Volume, path: str | os.PathLike, *, slope: float | None = None
) -> Path:
    geometry = reference.source_geometry
    if geometry is None:
        return _write_nifti(array_zyx, reference.affine, path, slope=slope)
    return _write_nifti(
        geometry.to_source(array_zyx), geometry.affine, path, header_forms=geometry.nifti_header, slope=slope
    )


def _write_nifti(
    array_zyx: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    *,
    header_forms: dict | None = None,
    slope: float | None = None,
) -> Path:
    path = Path(path)
    if not is_nifti_path(path):
        raise HepasegError(
            f"{path}: not a NIfTI file name: expected a name ending in .nii.gz or .nii, got "
            f"{path.name!r}. Add the .nii.gz suffix."
        )
    # (z, y, x) -> (x, y, z): NIfTI stores x fastest, so a C-ordered (z, y, x) array is already in the file's
    # byte order as a Fortran-ordered (x, y, z) view: no transposing copy before the write.
    data = np.asfortranarray(array_zyx.transpose(2, 1, 0))
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    if header_forms is not None and (header_forms["sform_code"] > 0 or header_forms["qform_code"] > 0):
        # A NIfTI source: keep its own forms and codes (an sform code 2 "aligned" stays 2).
        img.set_sform(header_forms["sform"], code=header_forms["sform_code"])
        img.set_qform(header_forms["qform"], code=header_forms["qform_code"])
    else:
        # Both forms carry the geometry; code 1 ("scanner") because it comes from the source scan.
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)  # kept on save: the data is already of the stored dtype
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "no details"
