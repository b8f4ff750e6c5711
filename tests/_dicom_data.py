"""DICOM test data made inside the tests: synthetic CT series, study folders and DICOM-SEG files.

Synthetic series hold a small abdomen-like phantom in HU (air, body, liver, tumour) whose
slices differ, so a mis-sorted or flipped stack shows up. The 3D-IRCADb 1.1 helpers copy
the real slices into a study folder under ``tmp_path`` (never into ../shared/data) and, as
the data README says, give the copies the FrameOfReferenceUID and PatientID that highdicom
needs to build a SEG on them.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

__all__ = [
    "STUDY_UID",
    "ircadb_datasets",
    "phantom",
    "permute_seg_frames",
    "write_ct_series",
    "write_ircadb_study",
    "write_seg",
    "write_series_from",
]

STUDY_UID = "1.2.826.0.1.3680043.9.77.1"
FOR_UID = "1.2.826.0.1.3680043.9.77.2"


def phantom(n: int = 10, rows: int = 40, cols: int = 36, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(image int16 HU (n, rows, cols), label uint8 {0, 1, 2})``: body ellipse, liver, a tumour."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices((n, rows, cols)).astype(float)
    body = ((y - rows / 2) / (0.45 * rows)) ** 2 + ((x - cols / 2) / (0.45 * cols)) ** 2 < 1
    liver = body & (((y - 0.45 * rows) / (0.25 * rows)) ** 2 + ((x - 0.4 * cols) / (0.22 * cols)) ** 2 < 1)
    liver &= (z >= 1) & (z <= n - 2)
    tumor = liver & (((y - 0.45 * rows) / 4) ** 2 + ((x - 0.4 * cols) / 4) ** 2 + ((z - n / 2) / 2) ** 2 < 1)
    image = np.full((n, rows, cols), -1000.0)
    image[body] = 40.0
    image[liver] = 110.0
    image[tumor] = 45.0
    image += 3 * z + rng.normal(0, 5, image.shape)  # slices differ: a mis-sorted stack changes values
    label = np.zeros((n, rows, cols), np.uint8)
    label[liver] = 1
    label[tumor] = 2
    return np.round(image).astype(np.int16), label


def _dataset(pixels: np.ndarray, *, sop_uid: str, sop_class: str = CTImageStorage) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(pixels.astype("<i2")).tobytes()
    return ds


def write_ct_series(
    folder: Path,
    image: np.ndarray,
    *,
    series_uid: str,
    number: int | None = 2,
    description: str = "ABDOMEN PORTAL",
    spacing: Sequence[float] = (2.5, 0.8, 0.7),
    origin: Sequence[float] = (-12.0, -15.0, 100.0),
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    name: Callable[[int], str] = lambda k: f"1-{k + 1:03d}.dcm",
    study_uid: str = STUDY_UID,
    frame_of_reference: str | None = FOR_UID,
    positions: Sequence[float] | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    intercept: float = -1024.0,
) -> list[Path]:
    """Write ``image`` (int16 HU, (n, rows, cols)) as a CT series; slice k at ``origin + positions[k] * normal``.

    Stored values are HU - intercept (slope 1), so the reader's rescale is exercised.
    Returns the files in slice order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    positions = [k * spacing[0] for k in range(len(image))] if positions is None else positions
    files = []
    for k, z in enumerate(positions):
        ds = _dataset((image[k].astype(np.int32) - int(intercept)).astype(np.int16), sop_uid=f"{series_uid}.{k + 1}")
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame_of_reference
        ds.PatientID, ds.PatientName = "PHANTOM-1", "Phantom^One"
        ds.PatientBirthDate = ds.PatientSex = ds.StudyDate = ds.ReferringPhysicianName = ds.AccessionNumber = ""
        ds.StudyTime, ds.StudyID = "101500", "1"
        ds.Modality = "CT"
        ds.ImageType = list(image_type)
        if number is not None:
            ds.SeriesNumber = number
        ds.SeriesDescription = description
        ds.AcquisitionTime = f"10{20 + (number or 0):02d}00"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + z * normal]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, intercept
        path = folder / name(k)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def ircadb_datasets(ircadb_dir: Path) -> list[Dataset]:
    """The 129 3D-IRCADb 1.1 slices (full datasets) in slice order (image_0 .. image_128)."""
    with zipfile.ZipFile(ircadb_dir / "PATIENT_DICOM.zip") as zf:
        names = [n for n in zf.namelist() if n.split("/")[-1].startswith("image_")]
        names.sort(key=lambda n: int(n.rsplit("_", 1)[1]))
        return [pydicom.dcmread(io.BytesIO(zf.read(n))) for n in names]


def write_series_from(
    datasets: Sequence[Dataset],
    folder: Path,
    *,
    series_uid: str,
    number: int,
    description: str,
    name: Callable[[int], str] = lambda k: f"1-{k + 1:03d}.dcm",
    patient_id: str = "IRCAD-1",
) -> list[Path]:
    """Copies of ``datasets`` as a new series of the test study (new UIDs, a Frame of Reference)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, src in enumerate(datasets):
        ds = pydicom.dcmread(io.BytesIO(_to_bytes(src)))  # a deep copy; the source stays untouched
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = STUDY_UID
        ds.FrameOfReferenceUID = FOR_UID
        ds.PatientID = patient_id
        ds.SeriesNumber = number
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        path = folder / name(k)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_ircadb_study(root: Path, ircadb_dir: Path) -> dict:
    """A study folder from 3D-IRCADb 1.1, series two folders below ``root``.

    * ``STUDY/SE2/1-001.dcm ..``: the 129 slices as "ABDOMEN PORTAL", series 2;
    * ``STUDY/SE1/IM0001 ..`` (no extension): every other slice as "ABDOMEN ARTERIAL", series 1
      (65 slices: a second CT phase with fewer images);
    * ``STUDY/SE99/1-001.dcm``: a coronal localiser (ImageType LOCALIZER), series 99;
    * ``STUDY/SE2/report.dcm``: a structured report (no pixels); ``DICOMDIR`` and a text file.

    Returns paths and UIDs of what was written.
    """
    source = ircadb_datasets(ircadb_dir)
    study = root / "STUDY"
    portal = write_series_from(source, study / "SE2", series_uid="1.2.826.0.1.3680043.9.77.2.2", number=2,
                               description="ABDOMEN PORTAL")
    arterial = write_series_from(source[::2], study / "SE1", series_uid="1.2.826.0.1.3680043.9.77.2.1", number=1,
                                 description="ABDOMEN ARTERIAL", name=lambda k: f"IM{k + 1:04d}")
    topo = _dataset(np.zeros((64, 64), np.int16), sop_uid="1.2.826.0.1.3680043.9.77.2.99.1")
    topo.StudyInstanceUID, topo.SeriesInstanceUID = STUDY_UID, "1.2.826.0.1.3680043.9.77.2.99"
    topo.Modality, topo.SeriesNumber, topo.SeriesDescription = "CT", 99, "Topogram 0.6 T20f"
    topo.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    topo.ImagePositionPatient, topo.ImageOrientationPatient = [-250.0, 0.0, 300.0], [1, 0, 0, 0, 0, -1]
    topo.PixelSpacing = [6.0, 6.0]
    (study / "SE99").mkdir(parents=True)
    topo.save_as(study / "SE99" / "1-001.dcm", enforce_file_format=True)
    report = _dataset(None, sop_uid="1.2.826.0.1.3680043.9.77.3.1", sop_class="1.2.840.10008.5.1.4.1.1.88.67")
    report.StudyInstanceUID, report.SeriesInstanceUID, report.Modality = STUDY_UID, "1.2.826.0.1.3680043.9.77.3", "SR"
    report.save_as(study / "SE2" / "report.dcm", enforce_file_format=True)
    (root / "DICOMDIR").write_bytes(b"\0" * 200)  # an index some exports add; never a slice
    (root / "README.txt").write_text("exported by a test\n")
    return {"study": study, "portal": portal, "arterial": arterial, "portal_uid": "1.2.826.0.1.3680043.9.77.2.2",
            "arterial_uid": "1.2.826.0.1.3680043.9.77.2.1"}


def write_seg(
    path: Path,
    source_files: Sequence[Path],
    segments: Sequence[tuple[str, str, np.ndarray]],
    *,
    fractional: np.ndarray | None = None,
    omit_empty_frames: bool = True,
) -> Path:
    """A SEG made with highdicom on ``source_files`` (slice order): ``(label, kind, mask (z, y, x))`` segments.

    ``kind`` is "liver", "tumor" or "other" (sets the coded property type). With
    ``fractional`` (one float array (z, y, x) in [0, 1]), a one-segment FRACTIONAL SEG is written instead.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    alg = hd.AlgorithmIdentificationSequence(name="test", family=codes.DCM.ArtificialIntelligence, version="1")
    descriptions, masks = [], []
    kinds = {"liver": (codes.SCT.AnatomicalStructure, codes.SCT.Liver),
             "tumor": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
             "other": (codes.SCT.AnatomicalStructure, codes.SCT.Spleen)}
    for i, (label, kind, mask) in enumerate(segments):
        category, prop = kinds[kind]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=label, segmented_property_category=category,
            segmented_property_type=prop, algorithm_type="AUTOMATIC", algorithm_identification=alg))
        masks.append(mask > 0)
    pixel_array = np.stack(masks, axis=-1).astype(np.uint8) if fractional is None else fractional.astype(np.float32)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel_array,
        segmentation_type="BINARY" if fractional is None else "FRACTIONAL",
        segment_descriptions=descriptions, series_instance_uid=pydicom.uid.generate_uid(), series_number=50,
        sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1",
        omit_empty_frames=omit_empty_frames,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def permute_seg_frames(path: Path, seed: int = 0) -> Path:
    """Rewrite a BINARY SEG with its frames (pixel data + per-frame groups) in random order."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    order = np.random.default_rng(seed).permutation(len(frames))
    groups = list(ds.PerFrameFunctionalGroupsSequence)
    ds.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]
    bits = np.packbits(frames[order].reshape(-1), bitorder="little")
    ds.PixelData = bits.tobytes() + (b"\0" if bits.size % 2 else b"")
    if "DimensionOrganizationType" in ds:
        del ds.DimensionOrganizationType  # frames are no longer sorted
    ds.save_as(path)
    return path
