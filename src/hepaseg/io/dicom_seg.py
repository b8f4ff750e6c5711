"""DICOM-SEG in and out (highdicom): labels from SEG objects, predictions as a BINARY SEG.

Labels in
---------
A labelled DICOM case is a CT series plus one or more SEG objects that reference
it. :func:`read_seg_label` turns them into the LiTS label map ``(z, y, x)`` uint8
{0 background, 1 liver, 2 tumour} on the series' own slice grid:

* segments map to liver and tumour by their SegmentLabel (or, failing that, the
  meaning of their SegmentedPropertyTypeCode), case-insensitively, a name alone or
  followed by a number (``Tumor``, ``Tumor_2``, ``Lesion 3``; not ``Liver Remnant``).
  Defaults: :data:`DEFAULT_SEG_LABELS`; ``--seg-labels "liver=Liver;tumor=Mass,Lesion"``
  replaces the names of the roles it gives (:func:`parse_seg_labels`). All tumour
  segments of all SEG files are united; tumour wins over liver where both are set;
* each frame is placed on the CT slice whose SOPInstanceUID it references
  (DerivationImageSequence) or, without references, whose position it has
  (PlanePositionSequence); either way its position, orientation, pixel spacing and
  size must match that slice's, else the SEG is "off the CT grid";
* FRACTIONAL frames are thresholded at 0.5 (``value >= 0.5 * MaximumFractionalValue``);
* slices no frame covers stay background (a SEG of the tumour slices only is fine).

Results out
-----------
:func:`write_seg` writes a BINARY SEG (tumour segment, and a liver segment after a
cascade) referencing every slice of the source series, in the source's own
geometry, with coded segment categories (SNOMED CT) and the algorithm's
identification (hepaseg, its version, the model and the checkpoint's SHA-256).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from hepaseg.errors import HepasegError
from hepaseg.io.atomic import atomic_path
from hepaseg.io.volume import LABEL_LIVER, LABEL_TUMOR

__all__ = [
    "DEFAULT_SEG_LABELS",
    "SegGeometry",
    "parse_seg_labels",
    "read_seg_label",
    "seg_referenced_series",
    "seg_segments",
    "write_seg",
]

#: Segment names per role (case-insensitive; a trailing number is allowed: "Tumor_2").
DEFAULT_SEG_LABELS: dict[str, tuple[str, ...]] = {
    "liver": ("Liver",),
    "tumor": ("Tumor", "Tumour", "Mass", "Lesion", "Neoplasm"),
}
_ROLE_ALIASES = {"liver": "liver", "tumor": "tumor", "tumour": "tumor"}
# A frame is on a CT slice when its position is within this share of a pixel / of the slice step.
_GRID_TOL = 0.1


@dataclass
class SegGeometry:
    """The CT series a SEG must fit: its slices in stack (z) order.

    Attributes:
        series_uid: SeriesInstanceUID of the CT series.
        sop_instance_uids: SOPInstanceUID of each slice, z order.
        positions: ``(z, 3)`` ImagePositionPatient of each slice, LPS mm.
        orientation: the series' ImageOrientationPatient (6 numbers).
        pixel_spacing: ``(between rows, between columns)`` mm.
        rows, columns: slice size in pixels.
    """

    series_uid: str
    sop_instance_uids: list[str]
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    rows: int
    columns: int


def parse_seg_labels(spec: str | Mapping[str, Sequence[str] | str] | None) -> dict[str, tuple[str, ...]]:
    """``"liver=Liver;tumor=Mass,Lesion"`` (or a mapping) -> names per role, defaults filled in.

    Raises:
        HepasegError: naming ``--seg-labels``: an unknown role, an empty name list or a part
            without ``=``.
    """
    labels = dict(DEFAULT_SEG_LABELS)
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return labels
    if isinstance(spec, str):
        pairs = []
        for part in (p for p in spec.split(";") if p.strip()):
            if "=" not in part:
                raise HepasegError(
                    f"--seg-labels: {part.strip()!r} has no '=': expected ROLE=NAME[,NAME...] parts joined by ';', "
                    'e.g. "liver=Liver;tumor=Mass,Lesion"'
                )
            role, names = part.split("=", 1)
            pairs.append((role, [n.strip() for n in names.split(",")]))
    else:
        pairs = [(role, [names] if isinstance(names, str) else list(names)) for role, names in spec.items()]
    for role, names in pairs:
        key = _ROLE_ALIASES.get(str(role).strip().lower())
        if key is None:
            raise HepasegError(
                f"--seg-labels: unknown role {str(role).strip()!r}: expected liver or tumor, "
                'e.g. "liver=Liver;tumor=Mass,Lesion"'
            )
        names = tuple(n for n in (str(x).strip() for x in names) if n)
        if not names:
            raise HepasegError(f"--seg-labels: role {key} has no segment names: expected {key}=NAME[,NAME...]")
        labels[key] = names
    return labels


def seg_referenced_series(ds: Dataset) -> list[str]:
    """SeriesInstanceUIDs a SEG references (ReferencedSeriesSequence, also inside studies)."""
    uids = [str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", [])]
    for study in ds.get("StudiesContainingOtherReferencedInstancesSequence", []):
        uids += [str(item.get("SeriesInstanceUID", "")) for item in study.get("ReferencedSeriesSequence", [])]
    return [u for u in uids if u]


def seg_segments(ds: Dataset, labels: Mapping[str, Sequence[str]] | None = None) -> list[dict]:
    """The segments of a SEG: number, label, property type, and role (liver/tumor/None)."""
    labels = labels or DEFAULT_SEG_LABELS
    out = []
    for item in ds.get("SegmentSequence", []):
        label = str(item.get("SegmentLabel", "") or "").strip()
        codes = item.get("SegmentedPropertyTypeCodeSequence", [])
        meaning = str(codes[0].get("CodeMeaning", "") or "").strip() if codes else ""
        role = _role(label, labels) or _role(meaning, labels)
        out.append({"number": int(item.SegmentNumber), "label": label, "type": meaning, "role": role})
    return out


def read_seg_label(
    segs: Sequence[tuple[str, str | os.PathLike]],
    geometry: SegGeometry,
    *,
    labels: Mapping[str, Sequence[str]] | None = None,
) -> tuple[np.ndarray, dict]:
    """LiTS label map ``(z, y, x)`` uint8 {0, 1, 2} from SEG files on the series' grid.

    Args:
        segs: ``(name for messages, path)`` of each SEG file.
        geometry: the CT series' slices (stack order).
        labels: names per role (see :func:`parse_seg_labels`; default :data:`DEFAULT_SEG_LABELS`).

    Returns:
        ``(label, meta)``; meta lists the files, their segments with roles, and how frames were placed.

    Raises:
        HepasegError: an unreadable SEG, a SEG referencing another series, no liver or
            tumour segment in any of them (the message lists their segments), frames off
            the CT grid.
    """
    import highdicom as hd

    labels = labels or DEFAULT_SEG_LABELS
    n, rows, cols = len(geometry.sop_instance_uids), geometry.rows, geometry.columns
    liver = np.zeros((n, rows, cols), dtype=bool)
    tumor = np.zeros((n, rows, cols), dtype=bool)
    z_of_uid = {uid: z for z, uid in enumerate(geometry.sop_instance_uids)}
    normal = np.cross(geometry.orientation[:3], geometry.orientation[3:])
    along = geometry.positions @ normal
    step = float(np.median(np.diff(along))) if n > 1 else 1.0
    found: list[dict] = []
    placed_by: set[str] = set()
    for name, path in segs:
        try:
            seg = hd.seg.segread(path)
        except Exception as exc:  # noqa: BLE001 - highdicom/pydicom raise many types on bad files
            raise HepasegError(
                f"{name}: cannot read DICOM-SEG: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no details'}: expected a valid Segmentation object. "
                "Re-export it."
            ) from None
        referenced = seg_referenced_series(seg)
        if referenced and geometry.series_uid not in referenced:
            raise HepasegError(
                f"{name}: SEG references series {', '.join(referenced)}: expected the CT series "
                f"{geometry.series_uid}. Pass the SEG made on this series (or choose its series with --series)."
            )
        segments = seg_segments(seg, labels)
        for s in segments:
            found.append({"file": name, **s})
        role_of = {s["number"]: s["role"] for s in segments}
        if not any(role_of.values()):
            continue
        _check_frame_geometry(seg, geometry, name)
        fractional = str(seg.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL"
        max_value = float(seg.get("MaximumFractionalValue", 255) or 255)
        shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
            number = int(_first(frame, shared, "SegmentIdentificationSequence").ReferencedSegmentNumber)
            role = role_of.get(number)
            if role is None:
                continue
            z, how = _place_frame(frame, i, name, geometry, z_of_uid, along, step, normal)
            placed_by.add(how)
            pixels = np.asarray(seg.get_stored_frame(i + 1))
            on = pixels >= 0.5 * max_value if fractional else pixels > 0
            (liver if role == "liver" else tumor)[z] |= on
    roles = {s["role"] for s in found if s["role"]}
    if not roles:
        listed = "; ".join(f"{Path(s['file']).name}: {s['number']} {s['label']!r}" + (f" ({s['type']})" if s["type"]
                                                                                    else "") for s in found)
        names = ", ".join(DEFAULT_SEG_LABELS["liver"] + DEFAULT_SEG_LABELS["tumor"]) if labels is DEFAULT_SEG_LABELS \
            else ", ".join(labels["liver"] + labels["tumor"])
        raise HepasegError(
            f"{segs[0][0] if len(segs) == 1 else ', '.join(n for n, _ in segs)}: no liver or tumour segment: "
            f"expected a segment named {names}, got segments {listed or 'none'}. Map them with --seg-labels, "
            'e.g. "liver=Liver;tumor=Mass,Lesion"'
        )
    label = np.zeros((n, rows, cols), dtype=np.uint8)
    label[liver] = LABEL_LIVER
    label[tumor] = LABEL_TUMOR
    meta = {
        "seg_files": [name for name, _ in segs],
        "seg_segments": found,
        "seg_frames_placed_by": sorted(placed_by),
        "seg_roles": sorted(roles),
    }
    return label, meta


def write_seg(
    path: str | os.PathLike,
    segments: Sequence[tuple[str, np.ndarray]],
    *,
    source_files: Sequence[str],
    sop_instance_uids: Sequence[str],
    algorithm: Mapping[str, str],
    series_description: str = "hepaseg segmentation",
) -> Path:
    """Write a BINARY DICOM-SEG referencing a CT series, atomically.

    Args:
        path: the ``.dcm`` file to write.
        segments: ``(role, mask)`` with role ``"tumor"`` or ``"liver"`` and mask ``(z, y, x)``
            in the SOURCE series' stack order (z = the i-th of ``source_files``), nonzero = inside.
        source_files: the series' files in stack order (their headers are re-read; pixels are not).
        sop_instance_uids: the SOPInstanceUIDs those files must have (guards against a
            folder changed since it was read).
        algorithm: ``name`` (model), ``version`` (hepaseg), and optional ``checkpoint_sha256``,
            ``threshold``: written into every segment's AlgorithmIdentificationSequence.
        series_description: SeriesDescription of the SEG.

    Raises:
        HepasegError: source files missing or changed, a source without FrameOfReferenceUID
            (a SEG must share the CT's frame of reference), masks of the wrong shape.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    sources = []
    for file, uid in zip(source_files, sop_instance_uids):
        if "::" in str(file):
            raise HepasegError(
                f"{file}: DICOM-SEG output needs the source slices as files: expected an unpacked series, got a "
                "zip entry. Unpack the archive and predict on the folder, or use --format nifti"
            )
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001
            raise HepasegError(
                f"{file}: cannot re-read the source DICOM for the SEG: {type(exc).__name__}: expected the file read "
                "before. Keep the input in place while predicting"
            ) from None
        if str(ds.get("SOPInstanceUID", "")) != uid:
            raise HepasegError(
                f"{file}: source changed since it was read: expected SOPInstanceUID {uid}, got "
                f"{ds.get('SOPInstanceUID')}. Do not modify the input while predicting"
            )
        sources.append(_complete_header(ds))
    check_seg_source(sources[0], source_files[0])
    n, rows, cols = len(sources), int(sources[0].Rows), int(sources[0].Columns)
    stack = np.zeros((n, rows, cols, len(segments)), dtype=np.uint8)
    descriptions = []
    alg = hd.AlgorithmIdentificationSequence(
        name="hepaseg",
        family=codes.DCM.ArtificialIntelligence,
        version=str(algorithm.get("version", "")),
        source="hepaseg",
        parameters={k: str(v) for k, v in algorithm.items() if k != "version"},
    )
    for i, (role, mask) in enumerate(segments):
        if mask.shape != (n, rows, cols):
            raise HepasegError(
                f"{path}: {role} mask shape {mask.shape}: expected {(n, rows, cols)} (the source series' slices)"
            )
        stack[..., i] = mask > 0
        if role == "tumor":
            category, kind, label = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm, "Tumor"
        elif role == "liver":
            category, kind, label = codes.SCT.AnatomicalStructure, codes.SCT.Liver, "Liver"
        else:
            raise HepasegError(f"{path}: segment role {role!r}: expected tumor or liver")
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=i + 1,
                segment_label=label,
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=alg,
                anatomic_regions=[codes.SCT.Liver] if role == "tumor" else None,
            )
        )
    number = sources[0].get("SeriesNumber")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=1000 + (int(number) if str(number or "").strip().isdigit() else 0),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="hepaseg",
        manufacturer_model_name=str(algorithm.get("name", "hepaseg"))[:64],
        software_versions=str(algorithm.get("version", "")),
        device_serial_number="none",
        content_label="HEPASEG",
        content_description=series_description[:64],
        series_description=series_description[:64],
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path


def check_seg_source(ds: Dataset, name: str) -> None:
    """Refuse a source series a SEG cannot reference: without FrameOfReferenceUID or StudyInstanceUID.

    Raises:
        HepasegError: naming the file and the missing attribute.
    """
    for keyword in ("FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            raise HepasegError(
                f"{name}: source DICOM has no {keyword}: expected one, since a DICOM-SEG must share the CT's "
                "frame of reference and study. Add it to the series (e.g. dcmodify) or use --format nifti"
            )


# --------------------------------------------------------------------------------------------
# helpers


def _role(name: str, labels: Mapping[str, Sequence[str]]) -> str | None:
    if not name:
        return None
    for role in ("tumor", "liver"):
        for candidate in labels.get(role, ()):
            if re.fullmatch(re.escape(candidate.lower()) + r"(?:[\s_\-#:.]*\d+)?", name.lower()):
                return role
    return None


def _first(frame: Dataset, shared: Dataset, keyword: str):
    """The single item of a functional group, per frame or shared."""
    seq = frame.get(keyword) or shared.get(keyword)
    if not seq:
        raise HepasegError(f"DICOM-SEG frame lacks {keyword}: expected it per frame or shared. Re-export the SEG")
    return seq[0]


def _check_frame_geometry(seg: Dataset, geometry: SegGeometry, name: str) -> None:
    if (int(seg.Rows), int(seg.Columns)) != (geometry.rows, geometry.columns):
        raise HepasegError(
            f"{name}: SEG frames are {seg.Rows}x{seg.Columns} pixels: expected the CT grid's "
            f"{geometry.rows}x{geometry.columns} (frames off the CT grid). Use a SEG made on this series"
        )
    shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    frame0 = seg.PerFrameFunctionalGroupsSequence[0]
    orient = (frame0.get("PlaneOrientationSequence") or shared.get("PlaneOrientationSequence") or [None])[0]
    if orient is not None and not np.allclose([float(v) for v in orient.ImageOrientationPatient],
                                              geometry.orientation, atol=1e-3):  # fmt: skip
        raise HepasegError(
            f"{name}: SEG orientation {list(orient.ImageOrientationPatient)}: expected the CT's "
            f"{geometry.orientation.tolist()} (frames off the CT grid). Use a SEG made on this series"
        )
    measures = (frame0.get("PixelMeasuresSequence") or shared.get("PixelMeasuresSequence") or [None])[0]
    if measures is not None and "PixelSpacing" in measures and not np.allclose(
        [float(v) for v in measures.PixelSpacing], geometry.pixel_spacing, rtol=1e-3
    ):
        raise HepasegError(
            f"{name}: SEG pixel spacing {list(measures.PixelSpacing)} mm: expected the CT's "
            f"{geometry.pixel_spacing.tolist()} mm (frames off the CT grid). Use a SEG made on this series"
        )


def _place_frame(frame, i, name, geometry, z_of_uid, along, step, normal) -> tuple[int, str]:
    """Slice index ``z`` of one SEG frame, and whether it was found by ``instance`` or ``position``."""
    uids = []
    for derivation in frame.get("DerivationImageSequence", []):
        uids += [str(src.ReferencedSOPInstanceUID) for src in derivation.get("SourceImageSequence", [])]
    position = None
    plane = frame.get("PlanePositionSequence")
    if plane:
        position = np.array([float(v) for v in plane[0].ImagePositionPatient])
    if uids:
        hits = [z_of_uid[u] for u in uids if u in z_of_uid]
        if not hits:
            raise HepasegError(
                f"{name}: SEG frame {i + 1} references SOP instance {uids[0]}, which is not in the CT series "
                f"{geometry.series_uid}: expected references to this series' slices. Use a SEG made on this series"
            )
        z, how = hits[0], "instance"
    elif position is not None:
        z = int(np.argmin(np.abs(along - position @ normal)))
        how = "position"
    else:
        raise HepasegError(
            f"{name}: SEG frame {i + 1} has neither a source image reference nor a plane position: expected one "
            "of them to place it on the CT. Re-export the SEG"
        )
    if position is not None:
        offset = position - geometry.positions[z]
        row_dir, col_dir = geometry.orientation[:3], geometry.orientation[3:]
        off_cols = abs(offset @ row_dir) / geometry.pixel_spacing[1]
        off_rows = abs(offset @ col_dir) / geometry.pixel_spacing[0]
        off_slices = abs(offset @ normal) / abs(step)
        if max(off_cols, off_rows, off_slices) > _GRID_TOL:
            raise HepasegError(
                f"{name}: SEG frame {i + 1} lies at {np.round(position, 2).tolist()} mm, "
                f"{off_slices:.2f} slice(s), {off_rows:.2f} row(s), {off_cols:.2f} column(s) from CT slice {z}: "
                "expected frames on the CT grid (frames off the CT grid). Use a SEG made on this series"
            )
    return z, how


# Type 2 attributes highdicom copies from the source into the SEG; anonymised exports drop
# some of them, and an empty value is what DICOM allows there.
_TYPE2_DEFAULTS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "AccessionNumber", "StudyID",
)  # fmt: skip


def _complete_header(ds: Dataset) -> Dataset:
    for keyword in _TYPE2_DEFAULTS:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "SliceThickness" not in ds:
        ds.SliceThickness = None
    return ds
