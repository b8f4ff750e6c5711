"""``hepaseg info PATH``: what a path holds, without predicting anything.

:func:`describe_path` lists the cases :func:`~hepaseg.io.find_cases` finds in ``PATH``
with their layout, size, spacing and label counts; for DICOM it adds every series of
the study (UID, number, description, modality, image count, spacing, orientation,
phase/time), which one is used and why, the SEG objects with their segments and the
series they reference, and the objects skipped. A case that cannot be read is listed
with its error instead of stopping the listing.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hepaseg.errors import HepasegError
from hepaseg.io.dicom import choose_series, scan_study, study_entries
from hepaseg.io.dicom_seg import parse_seg_labels, seg_referenced_series, seg_segments
from hepaseg.io.readers import DicomOptions, detect_layout, find_cases, read_volume
from hepaseg.io.volume import LABEL_LIVER, LABEL_TUMOR

__all__ = ["describe_path"]


def describe_path(path: str | os.PathLike, *, dicom: DicomOptions | None = None) -> dict[str, Any]:
    """A JSON-ready description of every case in ``path`` (see the module docstring).

    Args:
        path: a case file or folder, or a folder of cases.
        dicom: ``--series`` / ``--seg`` / ``--seg-labels``, as the other commands would use them.

    Returns:
        ``{"path": str, "cases": [{"case_id", "kind", "path", "shape", "spacing_mm", "label_counts",
        "warnings", "error", "dicom"?}, ...]}``; ``label_counts`` (voxels of background, liver, tumour)
        is None for unlabelled cases; ``dicom`` holds ``series`` (each with ``used``), ``choice``,
        ``segs`` and ``skipped``.

    Raises:
        HepasegError: ``path`` missing, empty or holding nothing recognisable.
    """
    options = dicom or DicomOptions()
    cases = find_cases([path])
    out = []
    for case in cases:
        kind, target = detect_layout(case)
        entry: dict[str, Any] = {"case_id": None, "kind": kind, "path": str(case), "shape": None,
                                 "spacing_mm": None, "label_counts": None, "warnings": [], "error": None}
        if kind == "dicom":
            entry["dicom"] = _describe_dicom(target, options)
        try:
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                volume = read_volume(case, with_label=True, dicom=options)
        except HepasegError as exc:
            entry["error"] = str(exc)
            out.append(entry)
            continue
        entry.update(
            case_id=volume.case_id,
            shape=list(volume.shape),
            spacing_mm=[round(float(s), 4) for s in volume.spacing],
            warnings=list(volume.meta.get("warnings", [])),
        )
        if volume.label is not None:
            counts = np.bincount(volume.label.ravel(), minlength=3)
            entry["label_counts"] = {"background": int(counts[0]), "liver": int(counts[LABEL_LIVER]),
                                     "tumor": int(counts[LABEL_TUMOR])}
        out.append(entry)
    return {"path": str(path), "cases": out}


def _describe_dicom(target: Path, options: DicomOptions) -> dict[str, Any]:
    entries = study_entries(target) if target.is_dir() else [(str(target), target)]
    scan = scan_study(entries, where=str(target))
    try:
        chosen, reason = choose_series(scan, options.series)
        chosen_uid = chosen.uid
    except HepasegError as exc:
        chosen_uid, reason = None, f"none: {exc}"
    series = [{**s.summary(), "used": s.uid == chosen_uid} for s in scan.series.values()]
    labels = parse_seg_labels(options.seg_labels)
    segs = []
    seg_files = list(scan.segs)
    given = {Path(f).resolve() for f in options.seg}
    import pydicom

    for f in options.seg:
        if Path(f).resolve() not in {Path(n).resolve() for n, _ in scan.segs}:
            seg_files.append((str(f), pydicom.dcmread(f, stop_before_pixels=True)))
    for name, ds in seg_files:
        references = seg_referenced_series(ds)
        segs.append({
            "file": name,
            "segments": seg_segments(ds, labels),
            "references": references,
            "used": chosen_uid is not None and (chosen_uid in references or Path(name).resolve() in given),
        })  # fmt: skip
    skipped: dict[str, int] = {}
    for _, what in scan.skipped:
        skipped[what] = skipped.get(what, 0) + 1
    return {"series": series, "chosen": chosen_uid, "choice": reason, "segs": segs, "skipped": skipped}
