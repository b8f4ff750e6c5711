"""Read real CT from the layouts users have: LiTS, MSD Task03, 3D-IRCADb, NIfTI, DICOM, MRC.

:func:`read_volume` detects the source from the path and returns a
:class:`~hepaseg.io.volume.Volume` (image float32 HU ``(z, y, x)``, spacing mm
``(z, y, x)``, RAS affine for index order ``(x, y, z)``, label uint8 {0, 1, 2}) in the
canonical orientation of :mod:`hepaseg.io.orientation` (rows anterior->posterior, columns
the patient's right->left), with the source's own geometry in ``source_geometry``;
:func:`find_cases` expands folders holding many cases into one path per case.

Layouts (each detected from the path; the path may be the folder or the image file):

=========  ====================================================================  =================
kind       layout                                                                case_id
=========  ====================================================================  =================
lits       ``volume-N.nii[.gz]`` + ``segmentation-N.nii[.gz]`` in one folder     ``lits-N``
msd        ``imagesTr/liver_N.nii.gz`` + ``labelsTr/liver_N.nii.gz``             ``msd-liver_N``
ircadb     ``PATIENT_DICOM`` + ``MASKS_DICOM/{liver,livertumorNN}``, folders     ``ircadb-1.1``
           or the distribution's ``.zip`` files (read without unpacking)
mrc        ``img_N.mrc`` + ``lab_N.mrc`` (the LiTS-117 sample)                   ``lits-N``
nifti      any other ``.nii[.gz]`` (image only)                                  file stem
dicom      a study folder (searched recursively; any file names, DICOMDIR or     folder name
           not) or one file; labels from DICOM-SEG objects referencing the
           chosen series (in the folder or ``--seg``)
=========  ====================================================================  =================

DICOM study folders may hold several series: :class:`DicomOptions` ``series``
(``--series``) chooses one, else the axial CT series with the most images is
used and ``Volume.meta["series_choice"]`` says why. Non-image objects (reports,
presentation states, secondary captures, localiser series) are skipped; odd
images inside the series are dropped with a warning (:mod:`hepaseg.io.dicom`).
A folder holding several studies is several cases (one per StudyInstanceUID).
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
from pydicom.misc import is_dicom

from hepaseg.errors import HepasegError
from hepaseg.io.dicom import (
    DicomStack,
    choose_series,
    read_datasets,
    scan_study,
    select_series,
    stack_series,
    study_entries,
)
from hepaseg.io.dicom_seg import SegGeometry, parse_seg_labels, read_seg_label, seg_referenced_series
from hepaseg.io.mrc import load_mrc
from hepaseg.io.nifti import check_label_values, is_nifti_path, load_nifti, nifti_header_geometry, nifti_stem
from hepaseg.io.orientation import to_canonical
from hepaseg.io.validate import check_volume
from hepaseg.io.volume import LABEL_LIVER, LABEL_TUMOR, Volume

__all__ = ["DicomOptions", "case_id_of", "detect_layout", "find_cases", "read_volume"]

_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_MRC_IMAGE = re.compile(r"^img_(.+)\.mrc$", re.IGNORECASE)
_IRCADB_SLICE = re.compile(r"^image_(\d+)$", re.IGNORECASE)
_IRCADB_FOLDER = re.compile(r"^3d-?ircadb-?(.+)$", re.IGNORECASE)
# Tumour mask folders: livertumor01, livertumor1, livertumors... ("liverkyst" is a cyst, not tumour).
_IRCADB_TUMOR = re.compile(r"^livertumou?rs?\d*$", re.IGNORECASE)
_MSD_IMAGE_DIRS = ("imagesTr", "imagesTs")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# How deep study folders are searched for DICOM files (patient/study/series/files is 3).
_DICOM_MAX_DEPTH = 8


@dataclass(frozen=True)
class DicomOptions:
    """How DICOM studies are read (the ``--series``, ``--seg`` and ``--seg-labels`` options).

    Attributes:
        series: a SeriesInstanceUID, SeriesNumber or description text choosing the CT
            series (see :func:`hepaseg.io.dicom.choose_series`); None: the axial CT series
            with the most images. Ignored for non-DICOM inputs (they hold one image).
        seg: DICOM-SEG files holding the labels of ONE case (besides those found in its
            study folder); each must reference the chosen series.
        seg_labels: segment names per role, ``"liver=Liver;tumor=Mass,Lesion"`` or a mapping
            (see :func:`hepaseg.io.dicom_seg.parse_seg_labels`); None: the defaults.
    """

    series: str | None = None
    seg: tuple[str | os.PathLike, ...] = ()
    seg_labels: str | Mapping[str, Sequence[str]] | None = None

    def check(self) -> DicomOptions:
        """Validate the options once (files exist, labels parse); returns self."""
        parse_seg_labels(self.seg_labels)
        for f in self.seg:
            if not Path(f).is_file():
                raise HepasegError(f"--seg: {f}: file not found: expected a DICOM-SEG file. Check the path.")
        return self


# --------------------------------------------------------------------------------------------
# public API


def read_volume(path: str | os.PathLike, *, with_label: bool = True, dicom: DicomOptions | None = None) -> Volume:
    """Read one CT case, detecting its layout from ``path``.

    Args:
        path: a case's folder or image file (see the module table): ``volume-3.nii``,
            ``imagesTr/liver_3.nii.gz``, ``3Dircadb1.1/``, ``lits117/`` or
            ``lits117/img_117.mrc``, any ``.nii[.gz]``, or a DICOM series folder.
        with_label: read the label too (lits, msd, ircadb, mrc; DICOM from its SEG objects);
            a missing label file is then an error. ``False`` skips it (``Volume.label is None``).
            Plain NIfTI sources, and DICOM without a SEG, have no label.
        dicom: series choice and SEG labels for DICOM study folders (:class:`DicomOptions`).

    Returns:
        A :class:`Volume`; ``image`` float32 ``(z, y, x)`` HU, ``label`` uint8 {0, 1, 2},
        both in the canonical orientation (``volume.to_source`` maps an array back).

    Raises:
        HepasegError: missing/empty/unrecognised source, several cases in one folder,
            corrupt files, shape mismatches, bad label values, non-CT DICOM, ...

    Example::

        vol = read_volume("../shared/data/3Dircadb1.1")
        vol.shape, vol.spacing  # (129, 512, 512), (1.6, 0.57, 0.57)
    """
    p = Path(path)
    kind, target = _detect(p)
    if dicom is not None and dicom.seg and kind != "dicom":
        raise HepasegError(
            f"--seg: {p} is a {kind} case, not a DICOM series: expected DICOM-SEG files only with a DICOM input. "
            "Drop --seg."
        )
    if kind == "dicom":
        volume = _read_dicom(target, with_label=with_label, options=dicom or DicomOptions())
    else:
        reader = {
            "lits": _read_lits,
            "msd": _read_msd,
            "ircadb": _read_ircadb,
            "mrc": _read_mrc,
            "nifti": _read_nifti,
        }[kind]
        volume = reader(target, with_label=with_label)
    if volume.source_geometry is None:  # NIfTI readers canonicalise themselves (they keep the header)
        # check_volume first: non-finite voxels, bad spacing, a singular affine are refused here.
        volume = to_canonical(check_volume(volume, target))
    volume.source = str(path)
    return volume


def find_cases(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand user-given sources to one path per case (each readable by :func:`read_volume`).

    * a LiTS folder holding many ``volume-N.nii[.gz]``: each volume file (natural order);
    * an MSD Task03 root (``imagesTr/``, ``labelsTr/``) or its ``imagesTr``: each
      ``imagesTr/liver_N.nii.gz`` (macOS ``._`` shadow files skipped);
    * a folder of 3D-IRCADb patient folders (``3Dircadb1.1``, ``3Dircadb1.2``, ...):
      each patient folder; likewise a folder of LiTS batches or other case folders;
    * anything else readable as one case: itself.

    Duplicates are dropped, order is kept (folders expand in natural order).

    Raises:
        HepasegError: a path that is missing, an empty folder, or nothing recognisable.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for given in paths:
        p = Path(given)
        if not p.exists():
            raise HepasegError(f"{p}: source does not exist: expected a CT file or folder. Check the path.")
        if p.is_file():
            if _file_kind(p) is None:
                raise HepasegError(
                    f"{p}: not a recognised CT file: expected .nii/.nii.gz, .mrc or DICOM, got "
                    f"{p.name!r}. Pass a case file or folder."
                )
            found = [p]
        else:
            if not _visible(p):
                raise HepasegError(f"{p}: folder is empty: expected CT cases inside. Check the path.")
            found = _cases_in_dir(p, depth=2)
            if not found:
                raise HepasegError(
                    f"{p}: no CT cases recognised: expected LiTS volume-N.nii, MSD imagesTr/, 3D-IRCADb "
                    f"patient folders, NIfTI, MRC or a DICOM series, got {_listing(p)}. Check the path."
                )
        for f in found:
            if f not in out:
                out.append(f)
    return out


def detect_layout(path: str | os.PathLike) -> tuple[str, Path]:
    """``(kind, path its reader takes)`` for one case (see the module table); nothing is decoded.

    Raises:
        HepasegError: as :func:`read_volume` for a missing, empty or unrecognised source.
    """
    return _detect(Path(path))


def case_id_of(path: str | os.PathLike) -> str:
    """The ``case_id`` :func:`read_volume` gives ``path``, from its name alone (nothing decoded).

    Batch prediction names each case's output folder with it before reading the case,
    so a resumed run can skip finished cases without reading them.
    """
    kind, target = _detect(Path(path))
    return _case_id(kind, target)


def _case_id(kind: str, target: Path) -> str:
    if kind == "lits":
        return f"lits-{_LITS_VOLUME.match(target.name).group(1)}"
    if kind == "msd":
        return f"msd-{nifti_stem(target)}"
    if kind == "nifti":
        return nifti_stem(target)
    if kind == "mrc":
        m = _MRC_IMAGE.match(target.name)
        return f"lits-{m.group(1)}" if m else target.stem
    if kind == "ircadb":
        m = _IRCADB_FOLDER.match(target.name)
        return f"ircadb-{m.group(1) if m else target.name}"
    return target.name if target.is_dir() else target.stem  # dicom


# --------------------------------------------------------------------------------------------
# layout detection


def _detect(p: Path) -> tuple[str, Path]:
    """(kind, path the kind's reader takes) for a user path."""
    if not p.exists():
        raise HepasegError(f"{p}: source does not exist: expected a CT file or folder. Check the path.")
    if p.is_file():
        kind = _file_kind(p)
        if kind is None:
            raise HepasegError(
                f"{p}: not a recognised CT file: expected .nii/.nii.gz, .mrc, DICOM or a 3D-IRCADb "
                f"PATIENT_DICOM.zip, got {p.name!r}. Pass a case file or folder."
            )
        return kind, (p.parent if kind == "ircadb" else p)
    if _is_ircadb_patient(p):
        return "ircadb", p
    children = _visible(p)
    if not children:
        raise HepasegError(f"{p}: folder is empty: expected one CT case. Check the path.")
    files = [c for c in children if c.is_file()]
    for kind, matches in (
        ("mrc", [f for f in files if _MRC_IMAGE.match(f.name)]),
        ("lits", [f for f in files if _LITS_VOLUME.match(f.name)]),
    ):
        if len(matches) == 1:
            return kind, matches[0]
        if len(matches) > 1:
            _many_cases(p, matches)
    if (p / "imagesTr").is_dir():
        _many_cases(p, _msd_images(p / "imagesTr"))
    if any(_looks_dicom(f) for f in files):
        return "dicom", p
    niftis = [f for f in files if is_nifti_path(f)]
    if len(niftis) == 1:
        return _file_kind(niftis[0]) or "nifti", niftis[0]
    if len(niftis) > 1:
        _many_cases(p, niftis)
    cases = _cases_in_dir(p, depth=1)
    if cases == [p]:
        return "dicom", p  # a study folder whose series lie in subfolders
    if len(cases) == 1:
        # One case further down (a study folder's series one or more folders deep, a LiTS
        # folder inside a batch folder): read it; a DICOM study keeps the folder given.
        kind, target = _detect(cases[0])
        return (kind, p) if kind == "dicom" and target.is_dir() else (kind, target)
    if cases:
        _many_cases(p, cases)
    raise HepasegError(
        f"{p}: no CT case recognised: expected LiTS volume-N.nii, MSD imagesTr/, a 3D-IRCADb patient "
        f"folder, NIfTI, MRC or a DICOM series, got {_listing(p)}. Check the path."
    )


def _file_kind(f: Path) -> str | None:
    name = f.name
    if name.lower() == "patient_dicom.zip":
        return "ircadb"
    if is_nifti_path(name):
        if _LITS_VOLUME.match(name):
            return "lits"
        if f.parent.name in _MSD_IMAGE_DIRS:
            return "msd"
        return "nifti"
    if name.lower().endswith(".mrc"):
        return "mrc"
    if _looks_dicom(f):
        return "dicom"
    return None


def _expand_dir(d: Path, *, depth: int, dicom: bool = True) -> list[Path]:
    """Cases inside folder ``d`` (itself when it is one case); [] when none is recognised.

    ``dicom=False`` leaves DICOM folders out (:func:`_cases_in_dir` groups them by study).
    """
    if _is_ircadb_patient(d):
        return [d]
    children = _visible(d)
    files = [c for c in children if c.is_file()]
    if (d / "imagesTr").is_dir():
        return _msd_images(d / "imagesTr")
    if d.name == "imagesTr":
        return _msd_images(d)
    lits = [f for f in files if _LITS_VOLUME.match(f.name)]
    if lits:
        return lits
    mrcs = [f for f in files if _MRC_IMAGE.match(f.name)]
    if len(mrcs) == 1:
        return [d]
    if mrcs:
        return mrcs
    if any(_looks_dicom(f) for f in files):
        return [d] if dicom else []  # DICOM below the top folder is grouped by study in _cases_in_dir
    niftis = [f for f in files if is_nifti_path(f)]
    if niftis:
        return niftis
    if depth <= 0:
        return []
    # A folder of case folders (3Dircadb1.1, 3Dircadb1.2, ...; LiTS "Training Batch 1/2").
    out: list[Path] = []
    for sub in (c for c in children if c.is_dir()):
        out.extend(_expand_dir(sub, depth=depth - 1, dicom=False))
    return out


def _cases_in_dir(d: Path, *, depth: int) -> list[Path]:
    """Cases inside ``d``: the layouts of :func:`_expand_dir` plus DICOM studies at any depth.

    DICOM files are grouped by StudyInstanceUID (one header per folder is read): one
    study is one case, whose path is the deepest folder holding all its series
    (``patient/study/series/*.dcm`` -> ``patient/study``), so a study folder with
    several series folders, or a series two folders down, is one case.
    """
    found = _expand_dir(d, depth=depth, dicom=False)
    if found == [d]:
        return found
    studies: dict[str, list[Path]] = {}
    for folder, uid in _dicom_folders(d):
        studies.setdefault(uid, []).append(folder)
    dicom_cases = []
    for uid, folders in studies.items():
        root = Path(os.path.commonpath([str(f) for f in folders]))
        dicom_cases.append((root, uid))
    for root, uid in dicom_cases:
        for other, other_uid in dicom_cases:
            if other_uid != uid and (other == root or root in other.parents):
                raise HepasegError(
                    f"{root}: holds DICOM files of study {uid} and, in {other}, of study {other_uid}: expected "
                    "each study in its own folder. Move one study out of the other's folder."
                )
    out = list(found)
    for root, _ in dicom_cases:
        if root not in out:
            out.append(root)
    return sorted(out, key=lambda c: [_natural_key(Path(part)) for part in c.relative_to(d).parts])


def _dicom_folders(d: Path, depth: int = _DICOM_MAX_DEPTH) -> Iterator[tuple[Path, str]]:
    """``(folder, StudyInstanceUID)`` of every folder under ``d`` that directly holds DICOM files.

    3D-IRCADb patient folders and MSD roots are other layouts and are not entered.
    Files of a folder without a StudyInstanceUID count as their own study (the folder).
    """
    if _is_ircadb_patient(d) or (d / "imagesTr").is_dir():
        return
    children = _visible(d)
    first = next((f for f in children if f.is_file() and _looks_dicom(f)), None)
    if first is not None:
        try:
            ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["StudyInstanceUID"], force=True)
            uid = str(ds.get("StudyInstanceUID", "") or "")
        except Exception:  # noqa: BLE001 - an unreadable file is reported when the case is read
            uid = ""
        yield d, uid or f"<folder {d}>"
    if depth > 0:
        for sub in (c for c in children if c.is_dir()):
            yield from _dicom_folders(sub, depth - 1)


def _is_ircadb_patient(d: Path) -> bool:
    return (d / "PATIENT_DICOM").is_dir() or (d / "PATIENT_DICOM.zip").is_file()


def _msd_images(images_dir: Path) -> list[Path]:
    return [f for f in _visible(images_dir) if f.is_file() and is_nifti_path(f)]


def _looks_dicom(f: Path) -> bool:
    if not f.is_file() or f.name.upper() == "DICOMDIR":
        return False
    if f.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        return is_dicom(f)  # the "DICM" magic after the 128-byte preamble
    except OSError:
        return False


def _visible(d: Path) -> list[Path]:
    """Entries of ``d`` in natural order, without hidden files (incl. macOS ``._x`` shadows)."""
    return sorted((c for c in d.iterdir() if not c.name.startswith(".")), key=_natural_key)


def _natural_key(p: Path) -> list:
    # volume-2 before volume-10, 3Dircadb1.2 before 3Dircadb1.10
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def _listing(d: Path, n: int = 5) -> str:
    names = [c.name + ("/" if c.is_dir() else "") for c in _visible(d)]
    if not names:
        return "nothing"
    return ", ".join(names[:n]) + (f", ... ({len(names)} entries)" if len(names) > n else "")


def _many_cases(p: Path, cases: list[Path]) -> None:
    shown = ", ".join(c.name for c in cases[:3]) + (", ..." if len(cases) > 3 else "")
    raise HepasegError(
        f"{p}: holds {len(cases)} cases ({shown}): expected one case. Pass one of them, or expand the "
        "folder with find_cases (hepaseg prepare does)."
    )


# --------------------------------------------------------------------------------------------
# NIfTI layouts: LiTS, MSD, plain


def _read_lits(volume_file: Path, *, with_label: bool) -> Volume:
    n = _LITS_VOLUME.match(volume_file.name).group(1)
    label_file = None
    if with_label:
        candidates = [volume_file.parent / f"segmentation-{n}{s}" for s in (".nii", ".nii.gz")]
        label_file = next((c for c in candidates if c.is_file()), None)
        if label_file is None:
            raise HepasegError(
                f"{volume_file}: LiTS label missing: expected {candidates[0].name} or {candidates[1].name} "
                "beside it. Put the segmentation next to the volume, or read with with_label=False."
            )
    return _nifti_case(volume_file, label_file, case_id=_case_id("lits", volume_file), kind="lits")


def _read_msd(image_file: Path, *, with_label: bool) -> Volume:
    label_file = None
    meta = {}
    if with_label and image_file.parent.name == "imagesTs":
        meta["label_note"] = "MSD imagesTs has no labels"
    elif with_label:
        label_file = image_file.parent.parent / "labelsTr" / image_file.name
        if not label_file.is_file():
            raise HepasegError(
                f"{image_file}: MSD label missing: expected {label_file}. Keep the Task03 layout "
                "(imagesTr/ beside labelsTr/), or read with with_label=False."
            )
    vol = _nifti_case(image_file, label_file, case_id=_case_id("msd", image_file), kind="msd")
    vol.meta.update(meta)
    return vol


def _read_nifti(file: Path, *, with_label: bool) -> Volume:
    return _nifti_case(file, None, case_id=_case_id("nifti", file), kind="nifti")


def _nifti_case(image_file: Path, label_file: Path | None, *, case_id: str, kind: str) -> Volume:
    image, spacing, affine = load_nifti(image_file, what="image")
    meta: dict = {"image_file": str(image_file)}
    label = None
    if label_file is not None:
        raw, _, label_affine = load_nifti(label_file, what="label")
        if raw.shape != image.shape:
            raise HepasegError(
                f"{label_file}: image/label shape mismatch: expected {image.shape} (z, y, x) like "
                f"{image_file.name}, got {raw.shape}. Pair each image with its own label file."
            )
        label = check_label_values(raw, label_file)
        meta["label_file"] = str(label_file)
        if not np.allclose(label_affine, affine, atol=1e-3):
            # Shapes agree, so the voxels correspond; the image's geometry is the one we keep.
            meta["label_affine_differs"] = True
    volume = Volume(
        image=image, spacing=spacing, affine=affine, label=label, case_id=case_id, kind=kind, meta=meta
    )
    return to_canonical(check_volume(volume, image_file), nifti_header=nifti_header_geometry(image_file))


# --------------------------------------------------------------------------------------------
# MRC (LiTS-117 sample)


def _read_mrc(image_file: Path, *, with_label: bool) -> Volume:
    m = _MRC_IMAGE.match(image_file.name)
    case_id = _case_id("mrc", image_file)
    data, spacing, note = load_mrc(image_file)
    image = data.astype(np.float32, copy=False)
    meta: dict = {"image_file": str(image_file)}
    if note:
        meta["spacing_note"] = note
    label = None
    if with_label and m:
        label_file = image_file.with_name(f"lab_{m.group(1)}.mrc")
        if not label_file.is_file():
            raise HepasegError(
                f"{image_file}: MRC label missing: expected {label_file.name} beside it. "
                "Fetch the pair, or read with with_label=False."
            )
        raw, _, _ = load_mrc(label_file)
        if raw.shape != image.shape:
            raise HepasegError(
                f"{label_file}: image/label shape mismatch: expected {image.shape} like {image_file.name}, "
                f"got {raw.shape}. Pair each image with its own label file."
            )
        label = check_label_values(raw, label_file)
        meta["label_file"] = str(label_file)
    # The header has no orientation. load_mrc returns the arrays (z, y, x) in the axial display
    # of the LiTS scan (liver on the image's left, spine at the bottom: checked on LiTS-117), so
    # the affine states the canonical LPS directions: x -> patient left, y -> posterior.
    sz, sy, sx = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    meta["orientation_note"] = "MRC has no orientation: axial display assumed (LiTS-117 sample layout)"
    return Volume(
        image=image, spacing=spacing, affine=affine, label=label, case_id=case_id, kind="mrc", meta=meta
    )


# --------------------------------------------------------------------------------------------
# DICOM series and 3D-IRCADb


def _read_dicom(target: Path, *, with_label: bool, options: DicomOptions) -> Volume:
    """A DICOM series from a study folder (searched recursively) or one file, with SEG labels.

    Steps: scan every file's header; choose the series (``options.series`` or the
    default); decode that series only (odd images dropped with a warning); with
    ``with_label``, build the label from the SEG objects referencing the series (in
    the folder or in ``options.seg``).
    """
    entries = study_entries(target) if target.is_dir() else [(str(target), target)]
    where = str(target)
    scan = scan_study(entries, where=where)
    if not scan.series and not scan.segs and not any(what != "not DICOM" for _, what in scan.skipped):
        raise HepasegError(
            f"{where}: no DICOM files: expected a CT series, got "
            f"{_listing(target) if target.is_dir() else target.name}. Check the path."
        )
    chosen, reason = choose_series(scan, options.series)
    datasets, _ = read_datasets((name, Path(name)) for name, _ in chosen.items)
    stack = stack_series(datasets, where=where)
    meta = _dicom_meta(stack, chosen.uid)
    summary = chosen.summary()
    meta.update(
        {
            "series": {k: summary[k] for k in ("uid", "number", "description", "modality", "phase", "time")},
            "series_choice": reason,
            "frame_of_reference_uid": summary["frame_of_reference_uid"],
            "study_instance_uid": summary["study_uid"],
        }
    )
    if len(scan.series) > 1:
        meta["other_series"] = {s.uid: s.n_images for s in scan.series.values() if s.uid != chosen.uid}
    if scan.skipped:
        meta["skipped_objects"] = {what: sum(1 for _, w in scan.skipped if w == what) for _, what in scan.skipped}
    label = None
    if with_label:
        segs = [(str(f), Path(f)) for f in options.seg]
        given = {Path(f).resolve() for f in options.seg}
        for name, ds in scan.segs:
            if chosen.uid in seg_referenced_series(ds) and Path(name).resolve() not in given:
                segs.append((name, Path(name)))
        ignored = [name for name, ds in scan.segs if chosen.uid not in seg_referenced_series(ds)]
        if ignored:
            meta["segs_of_other_series"] = ignored
        if segs:
            label, seg_meta = read_seg_label(
                segs, _seg_geometry(stack, chosen.uid, datasets), labels=parse_seg_labels(options.seg_labels)
            )
            meta.update(seg_meta)
    case_id = _case_id("dicom", target)
    return Volume(
        image=stack.image, spacing=stack.spacing, affine=stack.affine, label=label,
        case_id=case_id, kind="dicom", meta=meta,
    )  # fmt: skip


def _dicom_meta(stack: DicomStack, series_uid: str) -> dict:
    """Per-slice provenance of a DICOM stack (what a DICOM-SEG of the result must reference)."""
    meta = dict(stack.meta)
    meta["series_instance_uid"] = series_uid
    meta["sop_instance_uids"] = list(stack.sop_instance_uids)  # stack (z) order
    meta["dicom_files"] = list(stack.names)  # stack (z) order
    if stack.dropped:
        meta["warnings"] = [f"{name}: dropped from the series: {why}" for name, why in stack.dropped]
    return meta


def _seg_geometry(stack: DicomStack, series_uid: str, datasets) -> SegGeometry:
    by_name = dict(datasets)
    ref = by_name[stack.names[0]]
    positions = np.array([[float(v) for v in by_name[n].ImagePositionPatient] for n in stack.names])
    return SegGeometry(
        series_uid=series_uid,
        sop_instance_uids=list(stack.sop_instance_uids),
        positions=positions,
        orientation=np.array([float(v) for v in ref.ImageOrientationPatient]),
        pixel_spacing=np.array([float(v) for v in ref.PixelSpacing]),
        rows=int(ref.Rows),
        columns=int(ref.Columns),
    )


def _read_ircadb(folder: Path, *, with_label: bool) -> Volume:
    case_id = _case_id("ircadb", folder)

    with _members(folder, "PATIENT_DICOM") as (where, members):
        datasets, _ = read_datasets((name, load()) for name, _, load in members)
        if not datasets:
            raise HepasegError(
                f"{where}: no DICOM slices: expected PATIENT_DICOM/image_N files. Check the folder."
            )
        chosen, meta = select_series(datasets, where=where)
        stack = stack_series(chosen, where=where)
    numbers = [_slice_number(name) for name in stack.names]
    meta.update(_dicom_meta(stack, meta["series_instance_uid"]))
    meta["image_source"] = where

    label = None
    if with_label:
        label = _ircadb_label(folder, numbers, stack.image.shape, meta)
    return Volume(
        image=stack.image, spacing=stack.spacing, affine=stack.affine, label=label,
        case_id=case_id, kind="ircadb", meta=meta,
    )  # fmt: skip


def _ircadb_label(folder: Path, numbers: list[int], shape: tuple[int, ...], meta: dict) -> np.ndarray:
    """LiTS label from MASKS_DICOM: 1 where liver > 0, 2 where any livertumor* > 0.

    Mask slices are matched to image slices by their ``image_N`` number (the image
    slices themselves are in IPP order, which agrees with N).
    """
    z_of = {n: z for z, n in enumerate(numbers)}
    liver = np.zeros(shape, dtype=bool)
    tumor = np.zeros(shape, dtype=bool)
    with _members(folder, "MASKS_DICOM") as (where, members):
        by_organ: dict[str, list] = {}
        for name, rel, load in members:
            by_organ.setdefault(PurePosixPath(rel).parent.name, []).append((name, load))
        tumor_dirs = sorted(o for o in by_organ if _IRCADB_TUMOR.match(o))
        liver_dirs = [o for o in by_organ if o.lower() == "liver"]
        if not liver_dirs:
            raise HepasegError(
                f"{where}: no liver mask folder: expected MASKS_DICOM/liver/image_N, got folders "
                f"{sorted(by_organ)}. Use the complete 3D-IRCADb patient folder."
            )
        for organ in liver_dirs + tumor_dirs:
            target = liver if organ.lower() == "liver" else tumor
            seen = set()
            for name, load in by_organ[organ]:
                n = _slice_number(name)
                if n not in z_of:
                    raise HepasegError(
                        f"{name}: mask slice image_{n} has no matching PATIENT_DICOM/image_{n}: expected "
                        f"mask numbers among the {len(numbers)} image slices. Use masks of this patient."
                    )
                mask = _mask_pixels(load(), name)
                if mask.shape != shape[1:]:
                    raise HepasegError(
                        f"{name}: image/label shape mismatch: expected a {shape[1]}x{shape[2]} mask slice, "
                        f"got {mask.shape[0]}x{mask.shape[1]}. Use masks of this patient."
                    )
                target[z_of[n]] |= mask > 0
                seen.add(n)
            missing = sorted(set(numbers) - seen)
            if missing:
                raise HepasegError(
                    f"{where}: mask folder {organ!r} lacks {len(missing)} slice(s) "
                    f"(image_{missing[0]}, ...): "
                    f"expected one mask per image slice ({len(numbers)}). Re-extract MASKS_DICOM."
                )
    label = np.zeros(shape, dtype=np.uint8)
    label[liver] = LABEL_LIVER
    label[tumor] = LABEL_TUMOR
    meta["mask_source"] = where
    meta["tumor_folders"] = tumor_dirs
    meta["ignored_mask_folders"] = sorted(set(by_organ) - set(liver_dirs) - set(tumor_dirs))
    # The masks are drawn independently; a tumour voxel outside the liver keeps label 2.
    meta["tumor_voxels_outside_liver"] = int(np.count_nonzero(tumor & ~liver))
    return label


class _members:
    """Context manager over the files of ``folder/<name>/`` or ``folder/<name>.zip``.

    Yields ``(where, members)``; each member is ``(display_name, relative_posix_path,
    load)`` and ``load()`` returns a path or the file's bytes (zip entries are read
    into memory one at a time, never unpacked to disk).
    """

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self._zip: zipfile.ZipFile | None = None

    def __enter__(self) -> tuple[str, Iterator]:
        unpacked, zipped = self.folder / self.name, self.folder / f"{self.name}.zip"
        if unpacked.is_dir():
            files = sorted(f for f in unpacked.rglob("*") if f.is_file() and not f.name.startswith("."))
            members = [(str(f), f.relative_to(unpacked).as_posix(), (lambda f=f: f)) for f in files]
            return str(unpacked), members
        if zipped.is_file():
            try:
                self._zip = zipfile.ZipFile(zipped)
                infos = [
                    i for i in self._zip.infolist()
                    if not i.is_dir() and not i.filename.startswith("__MACOSX/")
                    and not PurePosixPath(i.filename).name.startswith(".")
                ]  # fmt: skip
            except (zipfile.BadZipFile, OSError) as exc:
                raise HepasegError(
                    f"{zipped}: cannot open zip (truncated or corrupt?): {exc}. "
                    "Re-download the patient folder."
                ) from None
            zf = self._zip
            members = []
            for info in infos:
                rel = PurePosixPath(info.filename)
                if rel.parts and rel.parts[0] == self.name:
                    rel = PurePosixPath(*rel.parts[1:])  # entries are "PATIENT_DICOM/image_N"
                members.append(
                    (f"{zipped}::{info.filename}", rel.as_posix(), (lambda i=info: _read_zip(zf, i, zipped)))
                )
            return str(zipped), members
        raise HepasegError(
            f"{self.folder}: 3D-IRCADb {self.name} missing: expected {self.name}/ or {self.name}.zip in the "
            "patient folder. Use the complete patient folder (or read with with_label=False)."
        )

    def __exit__(self, *exc) -> None:
        if self._zip is not None:
            self._zip.close()


def _read_zip(zf: zipfile.ZipFile, info: zipfile.ZipInfo, zipped: Path) -> bytes:
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise HepasegError(
            f"{zipped}::{info.filename}: cannot read zip entry (corrupt?): {exc}. "
            "Re-download the patient folder."
        ) from None


def _slice_number(name: str) -> int:
    m = _IRCADB_SLICE.match(PurePosixPath(name.replace("\\", "/")).name)
    if not m:
        raise HepasegError(
            f"{name}: 3D-IRCADb slice without a number: expected a file named image_N. "
            "Keep the distribution's file names."
        )
    return int(m.group(1))


def _mask_pixels(source: Path | bytes, name: str) -> np.ndarray:
    try:
        ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - corrupt or undecodable mask slice
        raise HepasegError(
            f"{name}: cannot read DICOM mask (truncated or corrupt?): {type(exc).__name__}. "
            "Re-extract MASKS_DICOM."
        ) from None
