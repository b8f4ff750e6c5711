"""DICOM CT series -> ``(z, y, x)`` HU array, spacing and RAS affine (pydicom).

Geometry follows the DICOM standard (PS3.3 C.7.6.2.1.1):

* ImageOrientationPatient (IOP) = ``[X, Y]``: ``X`` is the direction in which the
  column index increases along a row, ``Y`` the direction in which the row index
  increases; the slice normal is ``X x Y``.
* Slices are sorted by ImagePositionPatient (IPP) projected on the normal (not by
  file name or InstanceNumber, which scanners and anonymisers get wrong).
* Spacing is ``(step, PixelSpacing[0], PixelSpacing[1])`` = (between slices,
  between rows, between columns) in mm; the slice step comes from the positions,
  not SliceThickness (they differ for overlapping reconstructions).
* World coordinates are LPS; the affine is converted to NIfTI's RAS by negating
  the first two rows. Its third column is the mean IPP step vector, which keeps
  gantry-tilted series exact (the slice axis is then sheared, not normal).

Sources are ``(name, path-or-bytes)`` pairs so the same code reads a folder and a
zip archive (3D-IRCADb ships its slices zipped) without unpacking to disk.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from hepaseg.errors import HepasegError

__all__ = [
    "DicomStack",
    "dir_entries",
    "lps_to_ras",
    "read_datasets",
    "select_series",
    "stack_series",
]

# How much larger (in slices) the biggest series must be than the next one for the
# others (scouts, dose reports) to be ignored silently instead of being an error.
DOMINANCE_FACTOR = 5
# Two slices closer than this along the normal are the same position (mm).
DUPLICATE_TOL_MM = 1e-3
# Allowed deviation of one slice step from the median step (fraction); more means a gap.
STEP_TOL = 0.1

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class DicomStack:
    """One sorted CT series.

    Attributes:
        image: float32 ``(z, y, x)`` in HU (RescaleSlope/Intercept applied per slice).
        spacing: mm ``(z, y, x)``.
        affine: 4 x 4 RAS affine for index order ``(x, y, z)``.
        names: source name (file path or zip entry) of each slice, in ``z`` order.
        meta: notes (ignored series/files, orientation).
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    names: list[str]
    meta: dict = field(default_factory=dict)


def dir_entries(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """Regular, non-hidden files directly inside ``folder`` (sorted), minus DICOMDIR indexes."""
    folder = Path(folder)
    return [
        (str(p), p)
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    ]


def read_datasets(
    entries: Iterable[tuple[str, Path | bytes]], *, stop_before_pixels: bool = False
) -> tuple[list[tuple[str, Dataset]], list[str]]:
    """Parse DICOM files; files that are not DICOM at all are skipped, not fatal.

    Args:
        entries: ``(name, source)`` with ``source`` a path or the file's bytes.
        stop_before_pixels: read headers only.

    Returns:
        ``(datasets, skipped_names)``.
    """
    datasets, skipped = [], []
    for name, source in entries:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            # Old files lack the 128-byte preamble; accept them only if they parse as images.
            try:
                if isinstance(fp, io.BytesIO):
                    fp.seek(0)
                ds = pydicom.dcmread(fp, force=True, stop_before_pixels=stop_before_pixels)
            except Exception:  # noqa: BLE001 - anything unparsable is "not DICOM" here
                skipped.append(name)
                continue
            if "ImagePositionPatient" not in ds:
                skipped.append(name)
                continue
        except Exception as exc:  # noqa: BLE001 - a DICOM file that breaks mid-way is corrupt
            raise HepasegError(
                f"{name}: cannot read DICOM (truncated or corrupt?): {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no details'}. Re-export the series."
            ) from None
        datasets.append((name, ds))
    return datasets, skipped


def select_series(items: list[tuple[str, Dataset]], *, where: str) -> tuple[list[tuple[str, Dataset]], dict]:
    """Keep the one CT image series in ``items``.

    Files without PixelData (DICOMDIR, structured reports, presentation states)
    and other series are ignored only when one series clearly dominates (at least
    :data:`DOMINANCE_FACTOR` times as many images as the next one, e.g. a CT
    series beside a scout); otherwise the series are listed in the error.

    Raises:
        HepasegError: no image files, several comparable series, or a non-CT modality.
    """
    images = [(n, ds) for n, ds in items if "PixelData" in ds]
    if not images:
        raise HepasegError(
            f"{where}: no DICOM images: expected CT slices with pixel data, got "
            f"{len(items)} DICOM file(s) without pixels. Point to the folder holding the CT slices."
        )
    series: dict[str, list[tuple[str, Dataset]]] = {}
    for n, ds in images:
        series.setdefault(str(ds.get("SeriesInstanceUID", "<no SeriesInstanceUID>")), []).append((n, ds))
    ranked = sorted(series.items(), key=lambda kv: len(kv[1]), reverse=True)
    meta: dict = {}
    if len(ranked) > 1:
        if len(ranked[0][1]) < DOMINANCE_FACTOR * len(ranked[1][1]):
            listed = "; ".join(f"{uid} ({len(v)} files, {_description(v[0][1])!r})" for uid, v in ranked)
            raise HepasegError(
                f"{where}: holds {len(ranked)} image series: expected one, got {listed}. "
                "Move each series into its own folder and pass one."
            )
        meta["ignored_series"] = {uid: len(v) for uid, v in ranked[1:]}
    if len(images) < len(items):
        meta["ignored_files_without_pixels"] = len(items) - len(images)
    chosen = ranked[0][1]
    for n, ds in chosen:
        modality = str(ds.get("Modality", "") or "").strip()
        if modality and modality.upper() != "CT":
            raise HepasegError(
                f"{n}: DICOM modality is {modality!r}: expected 'CT'. hepaseg segments CT only "
                "(HU intensities); pass a CT series."
            )
    meta["series_instance_uid"] = ranked[0][0]
    return chosen, meta


def stack_series(items: list[tuple[str, Dataset]], *, where: str) -> DicomStack:
    """Sort one series along its slice normal and stack it into a HU volume.

    Raises:
        HepasegError: a single slice, missing/inconsistent geometry, duplicate
            slice positions, uneven slice steps (a missing slice), or undecodable pixels.
    """
    if len(items) < 2:
        raise HepasegError(
            f"{where}: a single 2D DICOM slice ({items[0][0] if items else 'none'}): expected a 3D series "
            "with at least 2 slices. Pass the folder holding the whole series."
        )
    ref_name, ref = items[0]
    iop = _floats(ref, "ImageOrientationPatient", ref_name, 6)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    rows, cols = int(ref.Rows), int(ref.Columns)
    pixel_spacing = _floats(ref, "PixelSpacing", ref_name, 2)  # (between rows, between columns)

    positions = []
    for name, ds in items:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise HepasegError(
                f"{name}: multi-frame DICOM ({ds.NumberOfFrames} frames): expected one slice per file. "
                "Convert enhanced/multi-frame CT to single-frame files or NIfTI first."
            )
        if not np.allclose(_floats(ds, "ImageOrientationPatient", name, 6), iop, atol=1e-4):
            raise HepasegError(
                f"{name}: ImageOrientationPatient differs from {ref_name}: expected one orientation per "
                "series. Separate the series (e.g. a tilted or reformatted one) into its own folder."
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols) or not np.allclose(
            _floats(ds, "PixelSpacing", name, 2), pixel_spacing, rtol=1e-4
        ):
            raise HepasegError(
                f"{name}: slice size/pixel spacing differs from {ref_name}: expected {rows}x{cols} at "
                f"{pixel_spacing.tolist()} mm. Pass a single series."
            )
        positions.append(_floats(ds, "ImagePositionPatient", name, 3))
    positions_arr = np.stack(positions)  # (n, 3) LPS mm
    along = positions_arr @ normal  # position of each slice along the normal, mm
    order = np.argsort(along, kind="stable")
    along, positions_arr = along[order], positions_arr[order]
    names = [items[i][0] for i in order]

    steps = np.diff(along)
    dup = np.flatnonzero(steps < DUPLICATE_TOL_MM)
    if dup.size:
        i = int(dup[0])
        raise HepasegError(
            f"{where}: duplicate slice position {along[i]:.3f} mm in {names[i]} and {names[i + 1]}: expected "
            "one slice per position. Remove the duplicate slices (often a second series mixed in)."
        )
    step = float(np.median(steps))
    if np.any(np.abs(steps - step) > STEP_TOL * step):
        raise HepasegError(
            f"{where}: uneven slice positions: expected a constant step, got steps "
            f"{steps.min():.3f}..{steps.max():.3f} mm (median {step:.3f}). A slice may be missing; "
            "re-export the complete series."
        )

    image = np.empty((len(items), rows, cols), dtype=np.float32)
    for z, i in enumerate(order):
        name, ds = items[i]
        image[z] = _hu_pixels(ds, name)

    # Voxel (x=c, y=r, z=k) -> IPP_0 + c*dc*X + r*dr*Y + k*mean_step (LPS), then -> RAS.
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * pixel_spacing[1]
    affine_lps[:3, 1] = col_dir * pixel_spacing[0]
    affine_lps[:3, 2] = (positions_arr[-1] - positions_arr[0]) / (len(items) - 1)
    affine_lps[:3, 3] = positions_arr[0]
    return DicomStack(
        image=image,
        spacing=(step, float(pixel_spacing[0]), float(pixel_spacing[1])),
        affine=lps_to_ras(affine_lps),
        names=names,
        meta={"orientation": iop.tolist()},
    )


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """DICOM LPS affine -> NIfTI RAS affine (negate world x and y)."""
    return LPS_TO_RAS @ affine_lps


def _description(ds: Dataset) -> str:
    return str(ds.get("SeriesDescription", "") or "").strip() or "no description"


def _floats(ds: Dataset, keyword: str, name: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.size != n:
        raise HepasegError(
            f"{name}: DICOM {keyword} missing or malformed: expected {n} numbers, got {value!r}. "
            "hepaseg needs the slice geometry; re-export the series with full headers."
        )
    return arr


def _hu_pixels(ds: Dataset, name: str) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for missing codecs/corrupt data
        syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "unknown transfer syntax")
        raise HepasegError(
            f"{name}: cannot decode DICOM pixels ({syntax}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no details'}. "
            "For compressed DICOM install pylibjpeg/gdcm or decompress the files (e.g. gdcmconv --raw)."
        ) from None
    if pixels.ndim != 2:
        raise HepasegError(
            f"{name}: DICOM pixels have shape {pixels.shape}: expected one grey-level 2D slice. "
            "Colour or multi-frame images are not CT slices."
        )
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)
