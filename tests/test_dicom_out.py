"""DICOM-SEG out: ``predict --format dicom-seg|both`` round trips, voxel for voxel.

The networks are exact toys (tumour where HU is near 100, liver where HU > 75) swapped into
real checkpoint files, so the expected masks are known. The SEG written is read back with
highdicom (by the source SOP instances, sorted here independently by ImagePositionPatient)
and with dcmqi's ``segimage2itkimage`` (the DCMTK-based reader behind 3D Slicer's DICOM-SEG
import), and compared with the NIfTI masks written beside it.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from torch import nn

import hepaseg.training
from _dicom_data import ircadb_datasets, write_ct_series, write_series_from
from hepaseg.errors import HepasegError
from hepaseg.inference import predict_case
from hepaseg.io import read_volume
from hepaseg.models import build_model

WINDOW = (-200.0, 250.0)
WHOLE = {"window": list(WINDOW), "size": 64, "context_slices": 1, "slices": "tumor", "target": "tumor"}
LIVER = {"window": list(WINDOW), "size": 64, "context_slices": 0, "slices": "all", "target": "liver"}
ROI = {"window": list(WINDOW), "size": 36, "context_slices": 1, "slices": "tumor", "target": "tumor",
       "roi": "liver", "roi_margin_mm": 10.0}
SERIES = "1.2.826.0.1.3680043.9.79.1"


def _w(hu: float) -> float:
    return (min(max(hu, WINDOW[0]), WINDOW[1]) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


class Above(nn.Module):
    """Liver toy: liver where HU > 75."""

    def __init__(self, k: int = 0) -> None:
        super().__init__()
        self.in_channels, self.k, self.t = 2 * k + 1, k, _w(75.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 200.0 * (x[:, self.k : self.k + 1] - self.t)


class Band(nn.Module):
    """Tumour toy: tumour where HU is within ~22 HU of 100."""

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.in_channels, self.k, self.c = 2 * k + 1, k, _w(100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 200.0 * (0.05 - (x[:, self.k : self.k + 1] - self.c).abs())


def _checkpoint(path: Path, options: dict) -> Path:
    torch.manual_seed(0)
    channels = 2 * int(options["context_slices"]) + 1
    net = build_model("unet", in_channels=channels, num_classes=1, base_width=4)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hepaseg": {"version": "0.1.0", "model": "unet", "model_options": {}, "in_channels": channels,
                            "num_classes": 1, "base_width": 4, "data_options": options, "metrics": {}, "config": {}}},
               path)
    return path


@pytest.fixture()
def toys(tmp_path, monkeypatch):
    """Checkpoint files whose networks load_checkpoint swaps for the toys above."""
    paths = {"tumor": _checkpoint(tmp_path / "tumor.ckpt", WHOLE), "liver": _checkpoint(tmp_path / "liver.ckpt", LIVER),
             "roi": _checkpoint(tmp_path / "roi.ckpt", ROI)}
    swap = {paths["tumor"]: (Band(), WHOLE), paths["liver"]: (Above(), LIVER), paths["roi"]: (Band(), ROI)}
    real = hepaseg.training.load_checkpoint

    def load(path, map_location="cpu"):
        loaded = real(path, map_location)
        loaded.model, loaded.data_options = swap[Path(path)][0], dict(swap[Path(path)][1])
        return loaded

    monkeypatch.setattr(hepaseg.training, "load_checkpoint", load)
    return paths


def _scene() -> np.ndarray:
    """(10, 64, 64) HU (the toys' input size: no resampling): air, body 0, liver 150 with a 100 HU tumour,
    and a 100 HU blob outside the liver."""
    image = np.full((10, 64, 64), -1000, np.int16)
    image[:, 2:62, 2:62] = 0
    image[2:8, 12:30, 10:34] = 150
    image[4:7, 16:21, 14:20] = 100
    image[3:5, 38:42, 40:44] = 100  # far from the liver: the cascade drops it
    return image


def _series(folder: Path, image: np.ndarray, *, shuffled: bool = False, iop=(1, 0, 0, 0, 1, 0)) -> list[Path]:
    perm = np.random.default_rng(5).permutation(len(image)) if shuffled else np.arange(len(image))
    return write_ct_series(folder, image, series_uid=SERIES, spacing=(2.0, 0.9, 0.8), iop=iop,
                           name=(lambda k: f"x{perm[k]:02d}") if shuffled else (lambda k: f"1-{k + 1:03d}.dcm"))


def _stack_uids(folder: Path) -> list[str]:
    """SOP instance UIDs sorted by ImagePositionPatient z (this test's own ordering, not hepaseg's)."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    headers.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return [str(ds.SOPInstanceUID) for ds in headers]


def _nifti_zyx(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)


def _seg_by_instance(path: Path, uids: list[str]) -> dict[str, np.ndarray]:
    """{segment label: (z, y, x) uint8} read with highdicom, slices in ``uids`` order."""
    seg = hd.seg.segread(path)
    numbers = list(seg.get_segment_numbers())
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, assert_missing_frames_are_empty=True)
    return {seg.get_segment_description(n).segment_label: pixels[..., i] for i, n in enumerate(numbers)}


@pytest.mark.parametrize(("shuffled", "iop"), [(False, (1, 0, 0, 0, 1, 0)), (True, (1, 0, 0, 0, 1, 0)),
                                               (True, (-1, 0, 0, 0, -1, 0))],
                         ids=["ordered", "shuffled-on-disk", "shuffled-rows-and-columns-flipped"])
def test_seg_round_trip_equals_the_nifti_mask(toys, tmp_path, shuffled, iop):
    """The flipped series is not canonical: hepaseg reorients it, and to_source must undo that for the SEG."""
    image = _scene()
    folder = tmp_path / "ct"
    _series(folder, image, shuffled=shuffled, iop=iop)
    out = tmp_path / "pred"
    result = predict_case(folder, out, checkpoint=toys["tumor"], output_format="both", progress=False, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == [".hepaseg-output.json", "lesions.csv", "lesions.json",
                                                      "overlay.png", "segmentation.dcm", "tumor_mask.nii.gz"]
    expected = (np.abs(image.astype(float) - 100) < 23).astype(np.uint8)  # the toy's rule, by hand
    nifti = _nifti_zyx(out / "tumor_mask.nii.gz")
    np.testing.assert_array_equal(nifti, expected)
    seg = _seg_by_instance(out / "segmentation.dcm", _stack_uids(folder))
    assert list(seg) == ["Tumor"]
    np.testing.assert_array_equal(seg["Tumor"], nifti)
    assert result.paths["seg"] == out / "segmentation.dcm" and len(result.lesions) == 2
    geometry = read_volume(folder).source_geometry
    assert (geometry is not None and not geometry.is_identity) == (iop[0] == -1)  # really reoriented


def test_seg_of_a_cascade_has_tumour_and_liver_segments(toys, tmp_path):
    image = _scene()
    folder = tmp_path / "ct"
    _series(folder, image, shuffled=True)
    out = tmp_path / "pred"
    predict_case(folder, out, checkpoint=toys["roi"], liver_checkpoint=toys["liver"], output_format="both",
                 progress=False, device="cpu")
    seg = _seg_by_instance(out / "segmentation.dcm", _stack_uids(folder))
    assert list(seg) == ["Tumor", "Liver"]
    np.testing.assert_array_equal(seg["Tumor"], _nifti_zyx(out / "tumor_mask.nii.gz"))
    np.testing.assert_array_equal(seg["Liver"], _nifti_zyx(out / "liver_mask.nii.gz"))
    assert seg["Liver"].sum() == int((image > 75).sum()) - 2 * 4 * 4  # liver incl. tumour; not the far blob
    assert seg["Tumor"][4:7, 16:21, 14:20].sum() > 45  # most of the tumour inside the liver is found
    assert not seg["Tumor"][3:5, 38:42, 40:44].any()  # the blob far from the liver is dropped by the cascade


def test_seg_metadata_identifies_hepaseg_and_references_every_slice(toys, tmp_path):
    folder = tmp_path / "ct"
    files = _series(folder, _scene())
    out = tmp_path / "pred"
    predict_case(folder, out, checkpoint=toys["tumor"], output_format="dicom-seg", progress=False, device="cpu")
    assert not (out / "tumor_mask.nii.gz").exists()  # dicom-seg only
    ds = pydicom.dcmread(out / "segmentation.dcm")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    (ref,) = ds.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == SERIES
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == {f"{SERIES}.{k + 1}"
                                                                                   for k in range(len(files))}
    assert ds.FrameOfReferenceUID == pydicom.dcmread(files[0]).FrameOfReferenceUID
    (segment,) = ds.SegmentSequence
    assert segment.SegmentLabel == "Tumor" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # morphologically abnormal
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # neoplasm
    alg = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "hepaseg" and alg.AlgorithmVersion == "0.1.0"
    assert f"checkpoint_sha256={hashlib.sha256(toys['tumor'].read_bytes()).hexdigest()}" in alg.AlgorithmParameters
    assert "name=unet" in alg.AlgorithmParameters
    assert ds.Manufacturer == "hepaseg" and ds.ManufacturerModelName == "unet"


def test_dcmqi_reads_the_seg_onto_the_same_voxels(toys, tmp_path):
    """dcmqi (the dev extra; the DICOM-SEG reader of 3D Slicer's QuantitativeReporting) reads our SEG."""
    dcmqi = pytest.importorskip("dcmqi", reason="dcmqi (dev extra) has no wheel for this platform")

    image = _scene()
    folder = tmp_path / "ct"
    _series(folder, image, shuffled=True)
    out = tmp_path / "pred"
    predict_case(folder, out, checkpoint=toys["roi"], liver_checkpoint=toys["liver"], output_format="both",
                 progress=False, device="cpu")
    exe = Path(dcmqi.__file__).parent / "bin" / "segimage2itkimage"
    conv = tmp_path / "dcmqi"
    conv.mkdir()
    run = subprocess.run([str(exe), "--inputDICOM", str(out / "segmentation.dcm"), "--outputDirectory", str(conv),
                          "-t", "nifti"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    ours = {"1": nib.load(str(out / "tumor_mask.nii.gz")), "2": nib.load(str(out / "liver_mask.nii.gz"))}
    for number, reference in ours.items():
        theirs = nib.load(str(conv / f"{number}.nii.gz"))
        # Every voxel dcmqi sets lies, in world mm, on a voxel our NIfTI sets, and vice versa.
        ijk = np.argwhere(np.asarray(theirs.dataobj) > 0)
        world = nib.affines.apply_affine(theirs.affine, ijk)
        back = nib.affines.apply_affine(np.linalg.inv(reference.affine), world)
        np.testing.assert_allclose(back, np.round(back), atol=1e-3)
        mask = np.zeros(reference.shape, bool)
        mask[tuple(np.round(back).astype(int).T)] = True
        np.testing.assert_array_equal(mask, np.asarray(reference.dataobj) > 0)


def test_dicom_seg_needs_a_dicom_input_with_a_frame_of_reference(toys, tmp_path):
    from hepaseg.io import Volume, write_image_nifti

    nii = tmp_path / "ct.nii.gz"
    write_image_nifti(Volume(image=_scene().astype(np.float32), spacing=(2.0, 0.9, 0.8), affine=np.eye(4)), nii)
    with pytest.raises(HepasegError, match=r"--format: DICOM-SEG output needs a DICOM input: expected a DICOM series,"
                                           r" got a nifti case .*Use --format nifti"):
        predict_case(nii, tmp_path / "a", checkpoint=toys["tumor"], output_format="dicom-seg", progress=False)
    write_ct_series(tmp_path / "nofor", _scene(), series_uid="1.2.3.99", frame_of_reference=None)
    with pytest.raises(HepasegError, match=r"1-001\.dcm: source DICOM has no FrameOfReferenceUID: expected one"):
        predict_case(tmp_path / "nofor", tmp_path / "b", checkpoint=toys["tumor"], output_format="both",
                     progress=False)
    with pytest.raises(HepasegError, match=r"--format: expected one of nifti, dicom-seg, both, got 'rtstruct'"):
        predict_case(nii, tmp_path / "c", checkpoint=toys["tumor"], output_format="rtstruct", progress=False)
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))


@pytest.mark.realdata
def test_realdata_seg_round_trip_on_ircadb(toys, ircadb_dir, tmp_path):
    folder = tmp_path / "ircadb-ct"
    write_series_from(ircadb_datasets(ircadb_dir), folder, series_uid="1.2.826.0.1.3680043.9.79.5", number=2,
                      description="ABDOMEN", name=lambda k: f"{(k * 53) % 129:03d}")  # shuffled on disk
    out = tmp_path / "pred"
    predict_case(folder, out, checkpoint=toys["roi"], liver_checkpoint=toys["liver"], output_format="both",
                 progress=False, device="cpu")
    seg = _seg_by_instance(out / "segmentation.dcm", _stack_uids(folder))
    tumour, liver = _nifti_zyx(out / "tumor_mask.nii.gz"), _nifti_zyx(out / "liver_mask.nii.gz")
    assert liver.sum() > 100_000 and tumour.sum() > 0  # real anatomy above 75 HU, and some 78-122 HU voxels
    np.testing.assert_array_equal(seg["Tumor"], tumour)
    np.testing.assert_array_equal(seg["Liver"], liver)
