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

Study folders (what a hospital or TCIA export holds) are read in two passes:
:func:`scan_study` parses every file's header (no pixels) and sorts the files
into image series, SEG objects and skipped objects (structured reports,
presentation states, secondary captures, localiser series, non-DICOM files);
:func:`choose_series` picks one series (``--series`` or the default rule), and
only that series' pixels are decoded by :func:`stack_series`.

Odd images inside a series (real exports have them) are dropped with a
:class:`~hepaseg.errors.HepasegWarning` naming each file: localiser images, images
whose orientation, size or pixel spacing differ from the majority (a coronal
reformat or scout sharing the series UID), and isolated slices off the series'
regular grid of positions. A gap in the grid (a missing slice) is still an error.

Sources are ``(name, path-or-bytes)`` pairs so the same code reads a folder and a
zip archive (3D-IRCADb ships its slices zipped) without unpacking to disk.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from hepaseg.errors import HepasegError, HepasegWarning

__all__ = [
    "DICOM_EXTRA_HINT",
    "DicomScan",
    "DicomStack",
    "SEG_SOP_CLASS",
    "SeriesInfo",
    "choose_series",
    "dir_entries",
    "lps_to_ras",
    "read_datasets",
    "scan_study",
    "select_series",
    "stack_series",
    "study_entries",
]

# How much larger (in slices) the biggest series must be than the next one for the
# others (scouts, dose reports) to be ignored silently instead of being an error.
# Used only by select_series (3D-IRCADb's PATIENT_DICOM); study folders use choose_series.
DOMINANCE_FACTOR = 5
# Two slices closer than this along the normal are the same position (mm).
DUPLICATE_TOL_MM = 1e-3
# Allowed deviation of one slice step from the median step (fraction); more means a gap.
STEP_TOL = 0.1
# At most this share of a series' slices may be dropped as off-grid strays (at least one);
# more means two interleaved reconstructions, which is an error, not something to guess.
MAX_STRAY_FRACTION = 0.1
# An image is axial when its slice normal is within this angle of the patient's z axis
# (gantry tilts of up to ~30 degrees still count as axial).
AXIAL_MAX_DEG = 35.0

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
DICOM_EXTRA_HINT = "pip install 'hepaseg[dicom]' (pylibjpeg with its libjpeg, openjpeg and rle plugins)"
# SOP classes that are never CT slices, by UID prefix -> what the listing calls them.
_SKIPPED_SOP_CLASSES = (
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.7", "secondary capture"),
    ("1.2.840.10008.5.1.4.1.1.481.", "RT object"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.66", "registration/spatial object"),  # after SEG (66.4) is taken out
    ("1.2.840.10008.5.1.4.1.1.67", "real world value map"),
)
# Words of SeriesDescription that name a contrast phase (reported by `hepaseg info`).
_PHASE_WORDS = (
    ("arterial", re.compile(r"arter|\bart\b|\bhap\b", re.I)),
    ("portal venous", re.compile(r"portal|\bpv\b|venous|\bven\b", re.I)),
    ("delayed", re.compile(r"delay|equilib|late", re.I)),
    ("non-contrast", re.compile(r"non.?con|native|plain|pre.?con|unenh|without", re.I)),
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class DicomStack:
    """One sorted CT series.

    Attributes:
        image: float32 ``(z, y, x)`` in HU (RescaleSlope/Intercept applied per slice).
        spacing: mm ``(z, y, x)``.
        affine: 4 x 4 RAS affine for index order ``(x, y, z)``.
        names: source name (file path or zip entry) of each slice, in ``z`` order.
        meta: notes (orientation, dropped images).
        sop_instance_uids: SOPInstanceUID of each slice, in ``z`` order (what a DICOM-SEG references).
        dropped: ``(name, reason)`` of every odd image left out of the stack.
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    names: list[str]
    meta: dict = field(default_factory=dict)
    sop_instance_uids: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class SeriesInfo:
    """One image series of a study folder, from headers only.

    Attributes:
        uid: SeriesInstanceUID.
        items: ``(name, header dataset)`` of each image file (no pixel data read).
        number: SeriesNumber, or None when absent/empty.
        description: SeriesDescription ("" when absent).
        modality: Modality ("" when absent).
        localizer: every image is a localiser/scout (ImageType LOCALIZER): never chosen.
    """

    uid: str
    items: list[tuple[str, Dataset]]
    number: int | None = None
    description: str = ""
    modality: str = ""
    localizer: bool = False

    @property
    def n_images(self) -> int:
        return len(self.items)

    @property
    def orientation(self) -> str:
        """``axial``/``coronal``/``sagittal``/``oblique`` of the majority of images, or ``unknown``."""
        return _plane_name(_majority_iop(self.items))

    def summary(self) -> dict:
        """JSON-ready description for ``hepaseg info`` (spacing in mm, times as in the header)."""
        ref = self.items[0][1]
        iop = _majority_iop(self.items)
        same = [ds for _, ds in self.items if _iop_of(ds) is not None and np.allclose(_iop_of(ds), iop, atol=1e-4)]
        step = _step_estimate(same, iop)
        ps = _try_floats(ref, "PixelSpacing", 2)
        phase = next((name for name, rx in _PHASE_WORDS if rx.search(self.description)), None)
        contrast = str(ref.get("ContrastBolusAgent", "") or "").strip()
        time = str(ref.get("AcquisitionTime", "") or ref.get("SeriesTime", "") or "").strip()
        return {
            "uid": self.uid,
            "number": self.number,
            "description": self.description,
            "modality": self.modality,
            "images": self.n_images,
            "rows": _int_or_none(ref.get("Rows")),
            "columns": _int_or_none(ref.get("Columns")),
            "pixel_spacing_mm": None if ps is None else [float(v) for v in ps],
            "slice_step_mm": step,
            "orientation": _plane_name(iop),
            "image_orientation": None if iop is None else [round(float(v), 4) for v in iop],
            "localizer": self.localizer,
            "phase": phase,
            "contrast": contrast or None,
            "time": _format_time(time),
            "date": str(ref.get("SeriesDate", "") or ref.get("AcquisitionDate", "") or "").strip() or None,
            "study_uid": str(ref.get("StudyInstanceUID", "") or ""),
            "frame_of_reference_uid": str(ref.get("FrameOfReferenceUID", "") or "") or None,
        }


@dataclass
class DicomScan:
    """What a study folder (or one DICOM file) holds, from headers only.

    Attributes:
        where: the folder or file scanned (for messages).
        series: image series by SeriesInstanceUID, in order of first appearance.
        segs: ``(name, header)`` of every DICOM-SEG object.
        skipped: ``(name, what)`` of objects that are not CT slices (reports, presentation
            states, secondary captures, non-DICOM files, ...).
    """

    where: str
    series: dict[str, SeriesInfo] = field(default_factory=dict)
    segs: list[tuple[str, Dataset]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def study_uids(self) -> list[str]:
        uids: list[str] = []
        for info in self.series.values():
            uid = str(info.items[0][1].get("StudyInstanceUID", "") or "")
            if uid not in uids:
                uids.append(uid)
        return uids


def dir_entries(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """Regular, non-hidden files directly inside ``folder`` (sorted), minus DICOMDIR indexes."""
    folder = Path(folder)
    return [
        (str(p), p)
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    ]


def study_entries(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """Every regular, non-hidden file under ``folder``, recursively (sorted), minus DICOMDIR indexes.

    File names may be anything (``1-001.dcm``, ``IM0001``, no extension): the
    headers decide what a file is, not its name. Hidden folders are not entered.
    """
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.upper() != "DICOMDIR":
                p = Path(root) / name
                out.append((str(p), p))
    return out


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
        ds = _read_one(name, source, stop_before_pixels=stop_before_pixels)
        if ds is None:
            skipped.append(name)
        else:
            datasets.append((name, ds))
    return datasets, skipped


def _read_one(name: str, source: Path | bytes, *, stop_before_pixels: bool) -> Dataset | None:
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        # Old files lack the 128-byte preamble; accept them only if they parse as DICOM objects.
        try:
            if isinstance(fp, io.BytesIO):
                fp.seek(0)
            ds = pydicom.dcmread(fp, force=True, stop_before_pixels=stop_before_pixels)
        except Exception:  # noqa: BLE001 - anything unparsable is "not DICOM" here
            return None
        if "ImagePositionPatient" not in ds and "SOPClassUID" not in ds:
            return None
        return ds
    except Exception as exc:  # noqa: BLE001 - a DICOM file that breaks mid-way is corrupt
        raise HepasegError(
            f"{name}: cannot read DICOM (truncated or corrupt?): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}. Re-export the series."
        ) from None


def scan_study(entries: Iterable[tuple[str, Path | bytes]], *, where: str) -> DicomScan:
    """Sort the files of a study folder into image series, SEG objects and skipped objects.

    Only headers are read (``stop_before_pixels``), so scanning a study of several
    thousand slices is quick; pixels are decoded later for the chosen series only.

    Args:
        entries: ``(name, path-or-bytes)`` of every file (see :func:`study_entries`).
        where: the folder, for messages.

    Returns:
        A :class:`DicomScan`.
    """
    scan = DicomScan(where=where)
    for name, source in entries:
        ds = _read_one(name, source, stop_before_pixels=True)
        if ds is None:
            scan.skipped.append((name, "not DICOM"))
            continue
        what = _object_kind(ds)
        if what == "seg":
            scan.segs.append((name, ds))
        elif what == "image":
            uid = str(ds.get("SeriesInstanceUID", "") or "<no SeriesInstanceUID>")
            info = scan.series.get(uid)
            if info is None:
                info = scan.series[uid] = SeriesInfo(
                    uid=uid,
                    items=[],
                    number=_int_or_none(ds.get("SeriesNumber")),
                    description=str(ds.get("SeriesDescription", "") or "").strip(),
                    modality=str(ds.get("Modality", "") or "").strip().upper(),
                )
            info.items.append((name, ds))
        else:
            scan.skipped.append((name, what))
    for info in scan.series.values():
        info.localizer = all(_is_localizer(ds) for _, ds in info.items)
    return scan


def choose_series(scan: DicomScan, series: str | None = None) -> tuple[SeriesInfo, str]:
    """The CT series to use, and why (a sentence ``hepaseg`` prints).

    Args:
        scan: from :func:`scan_study`.
        series: ``--series``: a SeriesInstanceUID, a SeriesNumber, or text found in the
            SeriesDescription (case-insensitive); None for the default: the axial CT
            series with the most images; on a tie, the one acquired last (highest
            SeriesNumber, then acquisition time): in multiphase liver CT that is the
            portal venous phase, the phase LiTS and most liver-tumour data use.

    Raises:
        HepasegError: no image series, ``series`` matching none or several series (the
            error lists them), a non-CT series, or no axial CT series for the default.
    """
    candidates = list(scan.series.values())
    if not candidates:
        found = f"{len(scan.skipped)} file(s): " + _count_kinds(scan.skipped) if scan.skipped else "nothing"
        if scan.segs:
            found += f" and {len(scan.segs)} DICOM-SEG object(s)"
        raise HepasegError(
            f"{scan.where}: no DICOM image series: expected CT slices with pixel data, got {found}. "
            "Point to the folder holding the CT series."
        )
    if series is not None:
        text = str(series).strip()
        matches = [s for s in candidates if s.uid == text]
        how = "SeriesInstanceUID"
        if not matches and text.isdigit():
            matches, how = [s for s in candidates if s.number == int(text)], "SeriesNumber"
        if not matches and text:
            matches = [s for s in candidates if text.lower() in s.description.lower()]
            how = "description"
        if len(matches) != 1:
            got = "none" if not matches else f"{len(matches)} series ({_list_series(matches)})"
            raise HepasegError(
                f"--series {text!r}: matches {got} in {scan.where}: expected exactly one of "
                f"{_list_series(candidates)}. Pass a SeriesInstanceUID, a SeriesNumber or a unique "
                "description word (hepaseg info lists them)."
            )
        chosen = matches[0]
        _require_ct(chosen)
        return chosen, f"--series {text!r} matched its {how}"
    if len(candidates) == 1 and not candidates[0].localizer:
        _require_ct(candidates[0])
        return candidates[0], "the only image series"
    usable = [s for s in candidates if not s.localizer and s.modality in ("CT", "")]
    axial = [s for s in usable if s.orientation == "axial"]
    if len(usable) == 1:
        axial = usable  # one CT series beside localisers or other modalities: use it, whatever its plane
    if not axial:
        if len(candidates) == 1:
            _require_ct(candidates[0])
        raise HepasegError(
            f"{scan.where}: no axial CT series: expected one, got {_list_series(candidates)}. "
            "Pass --series to choose one explicitly (hepaseg info lists them)."
        )

    def rank(s: SeriesInfo):
        # Majority-orientation images only: a reformat inside the series does not count.
        iop = _majority_iop(s.items)
        n = sum(1 for _, ds in s.items if _iop_of(ds) is not None and np.allclose(_iop_of(ds), iop, atol=1e-4))
        time = _format_time(str(s.items[0][1].get("AcquisitionTime", "") or "")) or ""
        return n, -1 if s.number is None else s.number, time

    ranked = sorted(axial, key=rank, reverse=True)
    chosen = ranked[0]
    n = rank(chosen)[0]
    if len(ranked) == 1:
        reason = f"the only {chosen.orientation} CT series ({n} images; {len(candidates) - 1} other series skipped)"
    elif len(ranked) > 1 and rank(ranked[1])[0] == n:
        reason = f"axial CT with the most images ({n}); tied, so the one acquired last (highest series number)"
    else:
        reason = f"axial CT with the most images ({n}; {len(candidates)} series found)"
    return chosen, reason


def select_series(items: list[tuple[str, Dataset]], *, where: str) -> tuple[list[tuple[str, Dataset]], dict]:
    """Keep the one CT image series in ``items`` (fully read datasets; 3D-IRCADb's PATIENT_DICOM).

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


def stack_series(items: list[tuple[str, Dataset]], *, where: str, warn: bool = True) -> DicomStack:
    """Sort one series along its slice normal and stack it into a HU volume.

    Odd images are dropped first (see the module docstring), each named in a
    :class:`~hepaseg.errors.HepasegWarning` (when ``warn``) and in ``DicomStack.dropped``.

    Args:
        items: ``(name, dataset)`` of one series, with pixel data.
        where: the series' folder, for messages.
        warn: emit the warnings (callers that only inspect pass False).

    Raises:
        HepasegError: a single slice, missing/inconsistent geometry, duplicate
            slice positions, uneven slice steps (a missing slice), or undecodable pixels.
    """
    items, dropped = _drop_odd_geometry(items, where)
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
        positions.append(_floats(ds, "ImagePositionPatient", name, 3))
    positions_arr = np.stack(positions)  # (n, 3) LPS mm
    along = positions_arr @ normal  # position of each slice along the normal, mm
    order = np.argsort(along, kind="stable")
    along, positions_arr = along[order], positions_arr[order]
    items = [items[i] for i in order]

    steps = np.diff(along)
    dup = np.flatnonzero(steps < DUPLICATE_TOL_MM)
    if dup.size:
        i = int(dup[0])
        raise HepasegError(
            f"{where}: duplicate slice position {along[i]:.3f} mm in {items[i][0]} and {items[i + 1][0]}: "
            "expected one slice per position. Remove the duplicate slices (often a second series mixed in)."
        )
    keep = _on_grid(along)
    if not keep.all() and (~keep).sum() <= max(1, int(MAX_STRAY_FRACTION * len(along))):
        for i in np.flatnonzero(~keep):
            dropped.append((items[i][0], f"isolated slice at {along[i]:.2f} mm, off the series' regular grid"))
        items = [it for it, k in zip(items, keep) if k]
        along, positions_arr = along[keep], positions_arr[keep]
        steps = np.diff(along)
    step = float(np.median(steps))
    if np.any(np.abs(steps - step) > STEP_TOL * step):
        raise HepasegError(
            f"{where}: uneven slice positions: expected a constant step, got steps "
            f"{steps.min():.3f}..{steps.max():.3f} mm (median {step:.3f}). A slice may be missing; "
            "re-export the complete series."
        )

    image = np.empty((len(items), rows, cols), dtype=np.float32)
    for z, (name, ds) in enumerate(items):
        image[z] = _hu_pixels(ds, name)

    if warn:
        for name, reason in dropped:
            warnings.warn(f"{name}: dropped from the series: {reason}", HepasegWarning, stacklevel=2)
    # Voxel (x=c, y=r, z=k) -> IPP_0 + c*dc*X + r*dr*Y + k*mean_step (LPS), then -> RAS.
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * pixel_spacing[1]
    affine_lps[:3, 1] = col_dir * pixel_spacing[0]
    affine_lps[:3, 2] = (positions_arr[-1] - positions_arr[0]) / (len(items) - 1)
    affine_lps[:3, 3] = positions_arr[0]
    meta: dict = {"orientation": iop.tolist()}
    if dropped:
        meta["dropped_images"] = [{"file": n, "reason": r} for n, r in dropped]
    return DicomStack(
        image=image,
        spacing=(step, float(pixel_spacing[0]), float(pixel_spacing[1])),
        affine=lps_to_ras(affine_lps),
        names=[n for n, _ in items],
        meta=meta,
        sop_instance_uids=[str(ds.get("SOPInstanceUID", "") or "") for _, ds in items],
        dropped=dropped,
    )


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """DICOM LPS affine -> NIfTI RAS affine (negate world x and y)."""
    return LPS_TO_RAS @ affine_lps


# --------------------------------------------------------------------------------------------
# helpers


def _drop_odd_geometry(
    items: list[tuple[str, Dataset]], where: str
) -> tuple[list[tuple[str, Dataset]], list[tuple[str, str]]]:
    """Keep the images of the majority geometry (orientation, size, pixel spacing); drop localisers."""
    dropped: list[tuple[str, str]] = []
    if len(items) > 1 and not all(_is_localizer(ds) for _, ds in items):
        kept = []
        for name, ds in items:
            if _is_localizer(ds):
                dropped.append((name, "localiser/scout image (ImageType LOCALIZER)"))
            else:
                kept.append((name, ds))
        items = kept
    groups: list[tuple[tuple, list[tuple[str, Dataset]]]] = []
    for name, ds in items:
        key = (
            _floats(ds, "ImageOrientationPatient", name, 6),
            (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)),
            _floats(ds, "PixelSpacing", name, 2),
        )
        for gkey, members in groups:
            if (np.allclose(gkey[0], key[0], atol=1e-4) and gkey[1] == key[1]
                    and np.allclose(gkey[2], key[2], rtol=1e-4)):  # fmt: skip
                members.append((name, ds))
                break
        else:
            groups.append((key, [(name, ds)]))
    if len(groups) <= 1:
        return items, dropped
    groups.sort(key=lambda g: len(g[1]), reverse=True)
    (ref_key, majority), (_, second) = groups[0], groups[1]
    if len(majority) == len(second):
        a, b = groups[0][1][0][0], groups[1][1][0][0]
        raise HepasegError(
            f"{where}: ImageOrientationPatient/size differs between {a} and {b}, {len(majority)} images each: "
            "expected one geometry per series. Pass a folder holding one series (or --series)."
        )
    for key, members in groups[1:]:
        if not np.allclose(key[0], ref_key[0], atol=1e-4):
            what = (f"orientation {_plane_name(key[0])} {np.round(key[0], 3).tolist()} differs from the "
                    f"series' {_plane_name(ref_key[0])} {np.round(ref_key[0], 3).tolist()} (a reformat or scout)")
        else:
            what = (f"size {key[1][0]}x{key[1][1]} at {np.round(key[2], 4).tolist()} mm differs from the "
                    f"series' {ref_key[1][0]}x{ref_key[1][1]} at {np.round(ref_key[2], 4).tolist()} mm")
        dropped.extend((name, what) for name, _ in members)
    return majority, dropped


def _on_grid(along: np.ndarray) -> np.ndarray:
    """Boolean mask of the slices on the series' regular grid (sorted positions in mm).

    The grid is the median step anchored at the longest run of regular steps; a
    slice whose position is more than :data:`STEP_TOL` of a step off that grid is
    off-grid. Slices on the grid but beyond a gap are kept (the gap is an error).
    """
    if along.size < 3:
        return np.ones(along.size, dtype=bool)
    steps = np.diff(along)
    step = float(np.median(steps))
    regular = np.abs(steps - step) <= STEP_TOL * step
    best_len, best_start, run_start = 0, 0, 0
    for i, ok in enumerate(np.append(regular, False)):
        if not ok:
            if i - run_start > best_len:
                best_len, best_start = i - run_start, run_start
            run_start = i + 1
    origin = along[best_start]
    k = (along - origin) / step
    return np.abs(k - np.round(k)) <= STEP_TOL


def _object_kind(ds: Dataset) -> str:
    """``image``, ``seg`` or what the object is when it is neither (for the skipped list)."""
    sop = str(ds.get("SOPClassUID", "") or "")
    if sop == SEG_SOP_CLASS:
        return "seg"
    for prefix, what in _SKIPPED_SOP_CLASSES:
        if sop.startswith(prefix):
            return what
    if "Rows" not in ds or "Columns" not in ds:
        return "object without pixel data"
    if "ImagePositionPatient" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return "image without position (not a CT slice)"
    return "image"


def _is_localizer(ds: Dataset) -> bool:
    image_type = ds.get("ImageType")
    values = [str(v).upper() for v in image_type] if image_type is not None else []
    return "LOCALIZER" in values


def _iop_of(ds: Dataset) -> np.ndarray | None:
    return _try_floats(ds, "ImageOrientationPatient", 6)


def _majority_iop(items: list[tuple[str, Dataset]]) -> np.ndarray | None:
    groups: list[tuple[np.ndarray, int]] = []
    for _, ds in items:
        if _is_localizer(ds) and len(items) > 1:
            continue
        iop = _iop_of(ds)
        if iop is None:
            continue
        for i, (ref, n) in enumerate(groups):
            if np.allclose(ref, iop, atol=1e-4):
                groups[i] = (ref, n + 1)
                break
        else:
            groups.append((iop, 1))
    if not groups:
        return _iop_of(items[0][1]) if items else None
    return max(groups, key=lambda g: g[1])[0]


def _plane_name(iop: np.ndarray | None) -> str:
    if iop is None:
        return "unknown"
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm == 0:
        return "unknown"
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    angle = float(np.degrees(np.arccos(min(1.0, normal[axis]))))
    if axis == 2 and angle <= AXIAL_MAX_DEG:
        return "axial"
    if angle > 10.0:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _step_estimate(datasets: list[Dataset], iop: np.ndarray | None) -> float | None:
    if iop is None or len(datasets) < 2:
        return None
    normal = np.cross(iop[:3], iop[3:])
    along = sorted(float(p @ normal) for p in (_try_floats(ds, "ImagePositionPatient", 3) for ds in datasets)
                   if p is not None)  # fmt: skip
    steps = np.diff(along)
    steps = steps[steps > DUPLICATE_TOL_MM]
    return round(float(np.median(steps)), 4) if steps.size else None


def _try_floats(ds: Dataset, keyword: str, n: int) -> np.ndarray | None:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        return None
    return arr if arr is not None and arr.size == n else None


def _int_or_none(value) -> int | None:
    try:
        return None if value is None or str(value).strip() == "" else int(float(str(value)))
    except (TypeError, ValueError):
        return None


def _format_time(value: str) -> str | None:
    """DICOM TM ``HHMMSS.frac`` -> ``HH:MM:SS``; None when empty or malformed."""
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?", value.strip())
    if not m:
        return None
    return ":".join(g for g in m.groups() if g)


def _require_ct(info: SeriesInfo) -> None:
    if info.modality and info.modality != "CT":
        raise HepasegError(
            f"{info.items[0][0]}: DICOM modality is {info.modality!r}: expected 'CT'. hepaseg segments CT only "
            "(HU intensities); pass a CT series."
        )


def _list_series(series: list[SeriesInfo]) -> str:
    parts = []
    for s in series:
        number = "-" if s.number is None else s.number
        parts.append(f"#{number} {s.description or 'no description'!r} ({s.modality or '?'}, {s.n_images} images, "
                     f"{s.orientation}{', localiser' if s.localizer else ''}, {s.uid})")
    return "; ".join(parts)


def _count_kinds(skipped: list[tuple[str, str]]) -> str:
    counts: dict[str, int] = {}
    for _, what in skipped:
        counts[what] = counts.get(what, 0) + 1
    return ", ".join(f"{n} {what}" for what, n in counts.items())


def _description(ds: Dataset) -> str:
    return str(ds.get("SeriesDescription", "") or "").strip() or "no description"


def _floats(ds: Dataset, keyword: str, name: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    arr = _try_floats(ds, keyword, n)
    if arr is None:
        raise HepasegError(
            f"{name}: DICOM {keyword} missing or malformed: expected {n} numbers, got {value!r}. "
            "hepaseg needs the slice geometry; re-export the series with full headers."
        )
    return arr


def _hu_pixels(ds: Dataset, name: str) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for missing codecs/corrupt data
        raise HepasegError(_decode_error(ds, name, exc)) from None
    if pixels.ndim != 2:
        raise HepasegError(
            f"{name}: DICOM pixels have shape {pixels.shape}: expected one grey-level 2D slice. "
            "Colour or multi-frame images are not CT slices."
        )
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


def _decode_error(ds: Dataset, name: str, exc: Exception) -> str:
    """One line: a missing decoder names the ``dicom`` extra; corrupt data says so."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no details'}"
    if syntax is not None and syntax.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            return (
                f"{name}: cannot decode DICOM pixels: no decoder exists for {syntax.name} ({syntax}): expected "
                "uncompressed, JPEG, JPEG-LS, JPEG 2000 or RLE pixel data. Decompress the files first "
                "(e.g. gdcmconv --raw or dcmdjpeg)."
            )
        if not available:
            return (
                f"{name}: cannot decode DICOM pixels: {syntax.name} ({syntax}) needs a decoder plugin that is not "
                f"installed: expected hepaseg's dicom extra. Install it: {DICOM_EXTRA_HINT}."
            )
        return (
            f"{name}: cannot decode DICOM pixels ({syntax.name}): {detail}: expected valid compressed data. "
            "The file may be truncated or corrupt; re-export the series."
        )
    return (
        f"{name}: cannot decode DICOM pixels ({syntax.name if syntax is not None else 'unknown transfer syntax'}): "
        f"{detail}. The file may be truncated or corrupt; re-export the series."
    )
