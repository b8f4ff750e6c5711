"""Tests for hepaseg.io readers/writers on tiny synthetic files and the real CT in ../shared/data.

Synthetic cases are written with nibabel / pydicom / mrcfile into tmp_path with
values chosen so that any axis swap, flip, mis-sorted slice or wrong rescale
shows up as a value mismatch; geometry is checked against hand-computed
DICOM LPS -> RAS coordinates.
"""

from __future__ import annotations

import io
import re
import time
import zipfile
from pathlib import Path

import mrcfile
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from hepaseg.errors import HepasegError
from hepaseg.io import DicomOptions, Volume, find_cases, read_volume, write_image_nifti, write_label_nifti

# --------------------------------------------------------------------------------------------
# helpers that write tiny files

AFFINE = np.array(
    [
        [-0.7, 0.0, 0.0, 120.0],
        [0.0, -0.8, 0.0, 95.5],
        [0.0, 0.0, 2.5, -310.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _xyz_image(shape_xyz=(6, 5, 4), seed=0) -> np.ndarray:
    # value encodes its own (x, y, z) index, so any transpose/flip is caught
    x, y, z = np.indices(shape_xyz)
    return (100 * z + 10 * y + x - 500).astype(np.float32)


def _xyz_label(shape_xyz=(6, 5, 4)) -> np.ndarray:
    lab = np.zeros(shape_xyz, dtype=np.uint8)
    lab[1:5, 1:4, 1:3] = 1
    lab[2:4, 2:3, 2] = 2
    return lab


def _save_nifti(path: Path, data: np.ndarray, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _dicom_bytes(
    pixels: np.ndarray,
    *,
    ipp,
    iop=(1, 0, 0, 0, 1, 0),
    pixel_spacing=(0.8, 0.6),
    slope=1.0,
    intercept=0.0,
    series_uid="1.2.826.0.1.3680043.9.7.1",
    modality="CT",
    instance=1,
    with_pixels=True,
) -> bytes:
    """One DICOM slice (int16 signed, or uint8 for masks) as file bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"{series_uid}.{instance}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.7"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 5.0  # deliberately not the slice step: the reader must use positions
    if with_pixels:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        if pixels.dtype == np.uint8:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        else:
            pixels = pixels.astype("<i2")
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# Oblique series: rows run along (cos30, sin30, 0), columns down -z; the normal has no
# z component, so sorting by IPP z alone (a common bug) would see duplicates.
OBLIQUE_X = np.array([np.cos(np.pi / 6), np.sin(np.pi / 6), 0.0])
OBLIQUE_Y = np.array([0.0, 0.0, -1.0])
OBLIQUE_N = np.cross(OBLIQUE_X, OBLIQUE_Y)
ORIGIN = np.array([-12.5, 30.0, 88.0])
STEP = 2.0
ROWS, COLS, NSLICES = 4, 5, 6
SLOPE, INTERCEPT = 2.0, -1000.0


def _stored(k: int) -> np.ndarray:
    r, c = np.indices((ROWS, COLS))
    return (100 * k + 10 * r + c).astype(np.int16)


def _oblique_ipp(k: int) -> np.ndarray:
    return ORIGIN + k * STEP * OBLIQUE_N


def _write_oblique_series(folder: Path) -> Path:
    """Slices k = 0..5 written under shuffled names with scrambled InstanceNumber."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [3, 0, 5, 1, 4, 2]  # file name index of slice k: name order != slice order
    for k in range(NSLICES):
        data = _dicom_bytes(
            _stored(k),
            ipp=_oblique_ipp(k),
            iop=(*OBLIQUE_X, *OBLIQUE_Y),
            slope=SLOPE,
            intercept=INTERCEPT,
            instance=NSLICES - k,
        )
        (folder / f"IM{names[k]:02d}.dcm").write_bytes(data)
    return folder


def _ras_of(ipp_lps: np.ndarray) -> np.ndarray:
    # DICOM LPS -> NIfTI RAS: negate x and y
    return np.array([-ipp_lps[0], -ipp_lps[1], ipp_lps[2]])


def _world(affine: np.ndarray, xyz) -> np.ndarray:
    return (affine @ np.array([*xyz, 1.0]))[:3]


# 3D-IRCADb-like patient: 12 slices of 6 x 6 (12 so that image_10 sorts after image_9
# only if the reader sorts by position/number, not by name)
IRC_N, IRC_SIZE = 12, 6


def _ircadb_masks() -> dict[str, dict[int, np.ndarray]]:
    masks: dict[str, dict[int, np.ndarray]] = {}
    for organ in ("liver", "livertumor01", "livertumor2", "liverkyst", "bone"):
        masks[organ] = {n: np.zeros((IRC_SIZE, IRC_SIZE), np.uint8) for n in range(IRC_N)}
    for n in range(2, 10):
        masks["liver"][n][1:5, 1:5] = 255
    masks["livertumor01"][3][2:4, 2:4] = 255
    masks["livertumor2"][10][2, 2] = 255  # unpadded folder name; slice 10 also tests the name order
    masks["livertumor2"][10][0, 0] = 255  # outside the liver (liver absent on slice 10)
    masks["liverkyst"][5][3, 3] = 255  # cyst: must NOT become tumour
    masks["bone"][6][:, :] = 255  # other organ: ignored
    return masks


def _ircadb_expected_label() -> np.ndarray:
    m = _ircadb_masks()
    lab = np.zeros((IRC_N, IRC_SIZE, IRC_SIZE), np.uint8)
    for n in range(IRC_N):
        lab[n][m["liver"][n] > 0] = 1
        lab[n][(m["livertumor01"][n] > 0) | (m["livertumor2"][n] > 0)] = 2
    return lab


def _irc_stored(n: int) -> np.ndarray:
    r, c = np.indices((IRC_SIZE, IRC_SIZE))
    return (100 * n + 10 * r + c - 1024).astype(np.int16)


def _write_ircadb(patient: Path, *, zipped: bool) -> Path:
    patient.mkdir(parents=True)
    files: dict[str, bytes] = {}
    for n in range(IRC_N):
        files[f"PATIENT_DICOM/image_{n}"] = _dicom_bytes(
            _irc_stored(n), ipp=(0.0, 0.0, 1.6 * n), pixel_spacing=(0.57, 0.57), instance=n
        )
    for organ, slices in _ircadb_masks().items():
        for n, m in slices.items():
            files[f"MASKS_DICOM/{organ}/image_{n}"] = _dicom_bytes(
                m,
                ipp=(0.0, 0.0, 1.6 * n),
                pixel_spacing=(0.57, 0.57),
                series_uid=f"1.2.3.{len(organ)}",
                instance=n,
            )
    rng = np.random.default_rng(0)
    names = list(files)
    rng.shuffle(names)  # archive order unrelated to slice order
    if zipped:
        for top in ("PATIENT_DICOM", "MASKS_DICOM"):
            with zipfile.ZipFile(patient / f"{top}.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(f"{top}/", b"")  # directory entry, as the distribution has
                for name in names:
                    if name.startswith(top + "/"):
                        zf.writestr(name, files[name])
    else:
        for name in names:
            (patient / name).parent.mkdir(parents=True, exist_ok=True)
            (patient / name).write_bytes(files[name])
    return patient


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_mrc(path: Path, data: np.ndarray) -> Path:
    with mrcfile.new(str(path), overwrite=True) as m:
        m.set_data(data)
    return path


# --------------------------------------------------------------------------------------------
# NIfTI layouts


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_lits_round_trip(tmp_path, suffix):
    img, lab = _xyz_image(), _xyz_label()
    _save_nifti(tmp_path / f"volume-7{suffix}", img)
    _save_nifti(tmp_path / f"segmentation-7{suffix}", lab.astype(np.float32))  # LiTS often stores float

    for path in (tmp_path, tmp_path / f"volume-7{suffix}"):
        vol = read_volume(path)
        assert (vol.kind, vol.case_id, vol.source) == ("lits", "lits-7", str(path))
        assert vol.image.dtype == np.float32 and vol.image.shape == (4, 5, 6)
        # image[z, y, x] == data[x, y, z]
        assert vol.image[3, 2, 1] == 100 * 3 + 10 * 2 + 1 - 500
        np.testing.assert_array_equal(vol.image, img.transpose(2, 1, 0))
        np.testing.assert_allclose(vol.spacing, (2.5, 0.8, 0.7), rtol=1e-6)
        np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)  # the file's own affine, not reoriented
        assert vol.label.dtype == np.uint8
        np.testing.assert_array_equal(vol.label, lab.transpose(2, 1, 0))

    assert read_volume(tmp_path / f"volume-7{suffix}", with_label=False).label is None


def test_msd_round_trip_and_find_cases(tmp_path):
    root = tmp_path / "Task03_Liver"
    for n in (2, 10, 1):
        _save_nifti(root / "imagesTr" / f"liver_{n}.nii.gz", _xyz_image() + n)
        _save_nifti(root / "labelsTr" / f"liver_{n}.nii.gz", _xyz_label())
    (root / "imagesTr" / "._liver_1.nii.gz").write_bytes(b"\0\5\26\7 macOS shadow file")
    _save_nifti(root / "imagesTs" / "liver_200.nii.gz", _xyz_image())

    cases = find_cases([root])
    assert cases == [root / "imagesTr" / f"liver_{n}.nii.gz" for n in (1, 2, 10)]
    assert find_cases([root / "imagesTr"]) == cases

    vol = read_volume(cases[2])
    assert (vol.kind, vol.case_id) == ("msd", "msd-liver_10")
    np.testing.assert_array_equal(vol.image, _xyz_image().transpose(2, 1, 0) + 10)
    np.testing.assert_array_equal(vol.label, _xyz_label().transpose(2, 1, 0))
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)

    test_vol = read_volume(root / "imagesTs" / "liver_200.nii.gz")
    assert test_vol.kind == "msd" and test_vol.label is None

    with pytest.raises(HepasegError, match=r"holds 3 cases"):
        read_volume(root)


def test_plain_nifti_and_4d(tmp_path):
    img = _xyz_image()
    vol = read_volume(_save_nifti(tmp_path / "scan_a.nii.gz", img))
    assert (vol.kind, vol.case_id, vol.label) == ("nifti", "scan_a", None)
    np.testing.assert_array_equal(vol.image, img.transpose(2, 1, 0))

    vol4 = read_volume(_save_nifti(tmp_path / "scan_b.nii.gz", img[..., None]))
    np.testing.assert_array_equal(vol4.image, img.transpose(2, 1, 0))
    np.testing.assert_allclose(vol4.spacing, (2.5, 0.8, 0.7), rtol=1e-6)

    with pytest.raises(HepasegError, match=r"scan_c\.nii\.gz.*4 dimensions"):
        read_volume(_save_nifti(tmp_path / "scan_c.nii.gz", np.stack([img, img], axis=-1)))


def test_nifti_scaling_applied(tmp_path):
    # int16 storage with scl_slope/scl_inter, as many CT NIfTIs have: HU = 2 * stored - 1024
    stored = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(stored, AFFINE)
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    vol = read_volume(tmp_path / "s.nii.gz")
    np.testing.assert_array_equal(vol.image, (2.0 * stored - 1024.0).transpose(2, 1, 0))


# --------------------------------------------------------------------------------------------
# DICOM series


def test_dicom_series_sorting_rescale_geometry(tmp_path):
    folder = _write_oblique_series(tmp_path / "series")
    (folder / "README.txt").write_text("not a DICOM file")  # stray files are skipped
    vol = read_volume(folder)
    assert (vol.kind, vol.case_id, vol.label) == ("dicom", "series", None)
    # The series as stacked (the source's own voxel order): this oblique, coronal-ish series is
    # reoriented to the canonical orientation, and to_source gives the stack back.
    stack = vol.to_source(vol.image)
    assert stack.shape == (NSLICES, ROWS, COLS)  # non-square slices are allowed
    for k in range(NSLICES):  # slice k holds 100 k + 10 r + c, rescaled
        np.testing.assert_array_equal(stack[k], SLOPE * _stored(k) + INTERCEPT)
    source_spacing = (STEP, 0.8, 0.6)  # step, not SliceThickness=5
    np.testing.assert_allclose(sorted(vol.spacing), sorted(source_spacing), rtol=1e-6)

    # Hand-computed world positions (LPS -> RAS) of voxel (0,0,0) and the far corner of the stack.
    source_affine = vol.source_geometry.affine
    np.testing.assert_allclose(_world(source_affine, (0, 0, 0)), _ras_of(_oblique_ipp(0)), atol=1e-6)
    far_lps = _oblique_ipp(NSLICES - 1) + (COLS - 1) * 0.6 * OBLIQUE_X + (ROWS - 1) * 0.8 * OBLIQUE_Y
    np.testing.assert_allclose(
        _world(source_affine, (COLS - 1, ROWS - 1, NSLICES - 1)), _ras_of(far_lps), atol=1e-6
    )
    # The canonical affine places every canonical voxel where the stack's affine places it.
    probe = np.zeros(vol.shape, bool)
    probe[1, 2, 3] = True
    (src_zyx,) = np.argwhere(vol.to_source(probe))
    np.testing.assert_allclose(_world(vol.affine, (3, 2, 1)), _world(source_affine, src_zyx[::-1]), atol=1e-6)


def test_write_label_nifti_geometry_dicom_source(tmp_path):
    vol = read_volume(_write_oblique_series(tmp_path / "series"))
    mask = np.zeros(vol.shape, np.uint8)
    mask[0, 0, 0] = 1
    mask[-1, -1, -1] = 2
    out = write_label_nifti(mask, vol, tmp_path / "out" / "mask.nii.gz")
    assert out == tmp_path / "out" / "mask.nii.gz"
    assert [p.name for p in out.parent.iterdir()] == ["mask.nii.gz"]  # no temp files left

    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, vol.source_geometry.affine, atol=1e-5)  # the series' own geometry
    data = np.asanyarray(img.dataobj)  # (x, y, z)
    assert data.shape == (COLS, ROWS, NSLICES)  # the series' own voxel order
    # the labelled voxels sit where the canonical volume's affine puts them
    zc, yc, xc = (s - 1 for s in vol.shape)
    for value, canonical_xyz in ((1, (0, 0, 0)), (2, (xc, yc, zc))):
        (ijk,) = np.argwhere(data == value)
        np.testing.assert_allclose(_world(img.affine, ijk), _world(vol.affine, canonical_xyz), atol=1e-4)

    # read back through hepaseg: same grid
    back = read_volume(out)
    np.testing.assert_array_equal(back.image, mask.astype(np.float32))
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-5)


def test_write_nifti_round_trip_and_errors(tmp_path):
    _save_nifti(tmp_path / "in" / "volume-3.nii.gz", _xyz_image())
    _save_nifti(tmp_path / "in" / "segmentation-3.nii.gz", _xyz_label())
    vol = read_volume(tmp_path / "in" / "volume-3.nii.gz")

    out = write_label_nifti(vol.label, vol, tmp_path / "label.nii.gz")
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, vol.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), _xyz_label())

    img_out = write_image_nifti(vol, tmp_path / "image.nii.gz")
    again = read_volume(img_out)
    np.testing.assert_array_equal(again.image, vol.image)
    np.testing.assert_allclose(again.affine, vol.affine, atol=1e-6)
    np.testing.assert_allclose(again.spacing, vol.spacing, rtol=1e-6)

    with pytest.raises(HepasegError, match=r"bad\.nii\.gz: mask shape mismatch: expected \(4, 5, 6\)"):
        write_label_nifti(np.zeros((4, 5, 5), np.uint8), vol, tmp_path / "bad.nii.gz")
    with pytest.raises(HepasegError, match=r"do not fit uint8"):
        write_label_nifti(np.full(vol.shape, 300), vol, tmp_path / "bad.nii.gz")
    with pytest.raises(HepasegError, match=r"not a NIfTI file name"):
        write_label_nifti(vol.label, vol, tmp_path / "bad.png")
    assert not (tmp_path / "bad.nii.gz").exists()


def test_dicom_dominant_series_ignores_scout_and_non_image_files(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    for k in range(5):
        (folder / f"ct{k}.dcm").write_bytes(_dicom_bytes(_stored(k), ipp=(0, 0, 3.0 * k), instance=k))
    (folder / "scout.dcm").write_bytes(
        _dicom_bytes(_stored(9), ipp=(0, 0, 1.0), series_uid="1.2.826.0.1.3680043.9.7.99")
    )
    (folder / "sr.dcm").write_bytes(
        _dicom_bytes(_stored(0), ipp=(0, 0, 0), with_pixels=False, series_uid="7.7")
    )
    vol = read_volume(folder)
    assert vol.shape == (5, ROWS, COLS)
    np.testing.assert_array_equal(vol.image[4], _stored(4))
    assert vol.meta["other_series"] == {"1.2.826.0.1.3680043.9.7.99": 1}
    assert vol.meta["skipped_objects"] == {"object without pixel data": 1}
    np.testing.assert_allclose(vol.spacing[0], 3.0)


# --------------------------------------------------------------------------------------------
# 3D-IRCADb


@pytest.mark.parametrize("zipped", [True, False], ids=["zipped", "unpacked"])
def test_ircadb_layouts(tmp_path, zipped):
    patient = _write_ircadb(tmp_path / "3Dircadb1.7", zipped=zipped)
    before = _snapshot(tmp_path)
    vol = read_volume(patient)
    assert _snapshot(tmp_path) == before  # nothing unpacked or written

    assert (vol.kind, vol.case_id) == ("ircadb", "ircadb-1.7")
    assert vol.shape == (IRC_N, IRC_SIZE, IRC_SIZE)
    for n in range(IRC_N):  # slice index == image_N (IPP z = 1.6 N), not archive/name order
        np.testing.assert_array_equal(vol.image[n], _irc_stored(n))
    np.testing.assert_allclose(vol.spacing, (1.6, 0.57, 0.57), rtol=1e-6)
    np.testing.assert_array_equal(vol.label, _ircadb_expected_label())
    assert vol.label[5, 3, 3] == 1  # the cyst stays liver
    assert vol.meta["tumor_folders"] == ["livertumor01", "livertumor2"]
    assert vol.meta["ignored_mask_folders"] == ["bone", "liverkyst"]
    assert vol.meta["tumor_voxels_outside_liver"] == 2

    assert read_volume(patient, with_label=False).label is None
    if zipped:  # the zip itself is also accepted as the path
        assert read_volume(patient / "PATIENT_DICOM.zip", with_label=False).case_id == "ircadb-1.7"


def test_ircadb_missing_liver_and_incomplete_masks(tmp_path):
    patient = _write_ircadb(tmp_path / "3Dircadb1.2", zipped=False)
    (patient / "MASKS_DICOM" / "livertumor01" / "image_4").unlink()
    with pytest.raises(HepasegError, match=r"mask folder 'livertumor01' lacks 1 slice\(s\) \(image_4"):
        read_volume(patient)
    for f in (patient / "MASKS_DICOM" / "liver").iterdir():
        f.unlink()
    (patient / "MASKS_DICOM" / "liver").rmdir()
    with pytest.raises(HepasegError, match=r"no liver mask folder"):
        read_volume(patient)


# --------------------------------------------------------------------------------------------
# MRC


def test_mrc_pair(tmp_path):
    z, y, x = np.indices((5, 4, 3))
    img = (100 * z + 10 * y + x).astype(np.float32)
    lab = np.zeros((5, 4, 3), np.uint16)
    lab[1:4, 1:3, 1] = 1
    lab[2, 2, 1] = 2
    _write_mrc(tmp_path / "img_9.mrc", img)
    _write_mrc(tmp_path / "lab_9.mrc", lab)
    for path in (tmp_path, tmp_path / "img_9.mrc"):
        vol = read_volume(path)
        assert (vol.kind, vol.case_id) == ("mrc", "lits-9")
        # The file's arrays are (x, y, z) of the scan (as the LiTS-117 sample): the reader transposes.
        np.testing.assert_array_equal(vol.image, img.transpose(2, 1, 0))
        np.testing.assert_array_equal(vol.label, lab.transpose(2, 1, 0))
        assert vol.label.dtype == np.uint8 and vol.spacing == (1.0, 1.0, 1.0)
        assert "nominal 1 mm" in vol.meta["spacing_note"]
    assert find_cases([tmp_path]) == [tmp_path]

    _write_mrc(tmp_path / "lab_9.mrc", (lab * 2).astype(np.uint16))
    with pytest.raises(HepasegError, match=r"lab_9\.mrc: label values outside \{0, 1, 2\}.*got 4"):
        read_volume(tmp_path)
    _write_mrc(tmp_path / "lab_9.mrc", lab[:4])
    with pytest.raises(HepasegError, match=r"lab_9\.mrc: image/label shape mismatch"):
        read_volume(tmp_path)
    (tmp_path / "img_9.mrc").write_bytes(b"garbage" * 10)
    with pytest.raises(HepasegError, match=r"img_9\.mrc: cannot read MRC"):
        read_volume(tmp_path)


# --------------------------------------------------------------------------------------------
# find_cases


def test_find_cases_layouts(tmp_path):
    lits = tmp_path / "lits"
    for n in (10, 2, 1):
        _save_nifti(lits / f"volume-{n}.nii", _xyz_image())
        _save_nifti(lits / f"segmentation-{n}.nii", _xyz_label())
    assert find_cases([lits]) == [lits / f"volume-{n}.nii" for n in (1, 2, 10)]  # natural order
    with pytest.raises(HepasegError, match=r"lits: holds 3 cases"):
        read_volume(lits)

    irc = tmp_path / "3Dircadb1"
    for name in ("3Dircadb1.10", "3Dircadb1.2"):
        (irc / name / "PATIENT_DICOM").mkdir(parents=True)
    (irc / "notes.txt").write_text("x")
    assert find_cases([irc]) == [irc / "3Dircadb1.2", irc / "3Dircadb1.10"]

    single = _save_nifti(tmp_path / "one.nii.gz", _xyz_image())
    series = _write_oblique_series(tmp_path / "series")
    assert find_cases([single, series, single]) == [single, series]  # duplicates dropped


def test_find_cases_errors(tmp_path):
    with pytest.raises(HepasegError, match=r"nope: source does not exist"):
        find_cases([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(HepasegError, match=r"empty: folder is empty"):
        find_cases([tmp_path / "empty"])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(HepasegError, match=r"junk: no CT cases recognised.*a\.txt"):
        find_cases([tmp_path / "junk"])
    with pytest.raises(HepasegError, match=r"a\.txt: not a recognised CT file"):
        find_cases([tmp_path / "junk" / "a.txt"])


# --------------------------------------------------------------------------------------------
# bad inputs


def test_read_missing_and_empty(tmp_path):
    with pytest.raises(HepasegError, match=r"missing\.nii\.gz: source does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HepasegError, match=r"empty: folder is empty"):
        read_volume(tmp_path / "empty")
    with pytest.raises(HepasegError, match=r"3Dircadb1\.5: 3D-IRCADb MASKS_DICOM missing"):
        patient = tmp_path / "3Dircadb1.5" / "PATIENT_DICOM"
        patient.mkdir(parents=True)
        for k in range(2):
            (patient / f"image_{k}").write_bytes(_dicom_bytes(_stored(k), ipp=(0, 0, k)))
        read_volume(patient.parent)


def test_lits_label_problems(tmp_path):
    _save_nifti(tmp_path / "volume-1.nii", _xyz_image())
    with pytest.raises(
        HepasegError, match=r"volume-1\.nii: LiTS label missing: expected segmentation-1\.nii"
    ):
        read_volume(tmp_path / "volume-1.nii")
    _save_nifti(tmp_path / "segmentation-1.nii", _xyz_label()[:, :, :3])
    with pytest.raises(HepasegError, match=r"segmentation-1\.nii: image/label shape mismatch"):
        read_volume(tmp_path / "volume-1.nii")
    bad = _xyz_label()
    bad[0, 0, 0] = 3
    _save_nifti(tmp_path / "segmentation-1.nii", bad)
    with pytest.raises(HepasegError, match=r"segmentation-1\.nii: label values outside \{0, 1, 2\}.*got 3"):
        read_volume(tmp_path / "volume-1.nii")
    half = _xyz_label().astype(np.float32)
    half[0, 0, 0] = 0.5
    _save_nifti(tmp_path / "segmentation-1.nii", half)
    with pytest.raises(HepasegError, match=r"label values outside.*got 0\.5"):
        read_volume(tmp_path / "volume-1.nii")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti(tmp_path, suffix):
    good = _save_nifti(tmp_path / f"full{suffix}", _xyz_image((16, 16, 8)))
    raw = good.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(
        HepasegError, match=re.escape(f"cut{suffix}: cannot read NIfTI (truncated or corrupt")
    ):
        read_volume(cut)
    assert cut.read_bytes() == raw[: len(raw) // 2]  # input untouched
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"\x00not a nifti" * 30)
    with pytest.raises(HepasegError, match=r"garbage.*cannot read NIfTI"):
        read_volume(garbage)


def test_single_slice_is_rejected(tmp_path):
    with pytest.raises(HepasegError, match=r"flat\.nii\.gz: image is a single 2D slice"):
        read_volume(_save_nifti(tmp_path / "flat.nii.gz", _xyz_image((6, 5, 1))))
    with pytest.raises(HepasegError, match=r"flat2d\.nii\.gz: image has 2 dimensions"):
        read_volume(_save_nifti(tmp_path / "flat2d.nii.gz", _xyz_image((6, 5, 1))[..., 0]))
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.dcm").write_bytes(_dicom_bytes(_stored(0), ipp=(0, 0, 0)))
    with pytest.raises(HepasegError, match=r"one: a single 2D DICOM slice"):
        read_volume(one)


def test_dicom_bad_series(tmp_path):
    mr = tmp_path / "mr"
    mr.mkdir()
    for k in range(3):
        (mr / f"{k}.dcm").write_bytes(_dicom_bytes(_stored(k), ipp=(0, 0, k), modality="MR"))
    with pytest.raises(HepasegError, match=r"\.dcm: DICOM modality is 'MR': expected 'CT'"):
        read_volume(mr)

    dup = tmp_path / "dup"
    dup.mkdir()
    for k, z in enumerate((0.0, 2.0, 2.0, 4.0)):
        (dup / f"{k}.dcm").write_bytes(_dicom_bytes(_stored(k), ipp=(0, 0, z), instance=k))
    with pytest.raises(HepasegError, match=r"dup: duplicate slice position 2\.000 mm"):
        read_volume(dup)

    two = tmp_path / "two"
    two.mkdir()
    for uid in ("1.2.3.100", "1.2.3.200"):
        for k in range(3):
            (two / f"{uid}_{k}.dcm").write_bytes(
                _dicom_bytes(_stored(k), ipp=(0, 0, k), series_uid=uid, instance=k)
            )
    # Two series of one study, equal in size: no longer refused (issue 10); the choice is explained
    # (tests/test_dicom_study.py covers the rule); a --series that matches nothing is refused.
    assert "tied" in read_volume(two).meta["series_choice"]
    with pytest.raises(HepasegError, match=r"--series '9': matches none in .*two: expected exactly one of"):
        read_volume(two, dicom=DicomOptions(series="9"))

    gap = tmp_path / "gap"
    gap.mkdir()
    for k, z in enumerate((0.0, 2.0, 4.0, 8.0)):
        (gap / f"{k}.dcm").write_bytes(_dicom_bytes(_stored(k), ipp=(0, 0, z), instance=k))
    with pytest.raises(HepasegError, match=r"gap: uneven slice positions"):
        read_volume(gap)


# --------------------------------------------------------------------------------------------
# real data (../shared/data)


@pytest.fixture(scope="module")
def ircadb_volume(ircadb_dir) -> Volume:
    t0 = time.perf_counter()
    vol = read_volume(ircadb_dir)
    print(f"\nread 3D-IRCADb 1.1 from zips in {time.perf_counter() - t0:.2f} s")
    return vol


def _zip_slices(zip_path: Path, folder: str) -> np.ndarray:
    """Independent reference: the DICOMs of one zip folder stacked by their image_N number."""
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.startswith(folder + "/image_")]
        names.sort(key=lambda n: int(n.rsplit("_", 1)[1]))
        return np.stack([pydicom.dcmread(io.BytesIO(zf.read(n))).pixel_array for n in names])


@pytest.mark.realdata
def test_realdata_ircadb(ircadb_volume, ircadb_dir):
    vol = ircadb_volume
    assert (vol.kind, vol.case_id) == ("ircadb", "ircadb-1.1")
    assert vol.shape == (129, 512, 512)
    np.testing.assert_allclose(vol.spacing, (1.6, 0.57, 0.57), atol=0.01)
    assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8

    per_slice = vol.label.reshape(129, -1)
    assert int((per_slice >= 1).any(axis=1).sum()) == 98
    assert int((per_slice == 2).any(axis=1).sum()) == 74
    tumour = int((vol.label == 2).sum())
    print(f"3D-IRCADb 1.1 tumour voxels: {tumour}")
    assert 200_000 <= tumour <= 230_000

    liver_ref = _zip_slices(ircadb_dir / "MASKS_DICOM.zip", "MASKS_DICOM/liver") > 0
    assert int(np.count_nonzero((vol.label == 2) & ~liver_ref)) == 0  # no tumour outside the liver mask
    np.testing.assert_array_equal(vol.label >= 1, liver_ref)  # mask slices matched to the right images
    assert vol.meta["tumor_voxels_outside_liver"] == 0

    with zipfile.ZipFile(ircadb_dir / "PATIENT_DICOM.zip") as zf:
        for n in (0, 64, 128):  # image_N lands at z = N, HU = stored (slope 1, intercept 0)
            ref = pydicom.dcmread(io.BytesIO(zf.read(f"PATIENT_DICOM/image_{n}"))).pixel_array
            np.testing.assert_array_equal(vol.image[n], ref.astype(np.float32))


@pytest.mark.realdata
def test_realdata_ircadb_write_mask_overlays(ircadb_volume, tmp_path):
    vol = ircadb_volume
    out = write_label_nifti(vol.label, vol, tmp_path / "ircadb-1.1_label.nii.gz")
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-5)
    # IPP of image_N is (0, 0, 1.6 N) LPS -> RAS (0, 0, 1.6 N) at voxel (0, 0, N)
    np.testing.assert_allclose(_world(img.affine, (0, 0, 128)), (0.0, 0.0, 1.6 * 128), atol=1e-3)
    np.testing.assert_allclose(_world(img.affine, (511, 511, 0)), (-0.57 * 511, -0.57 * 511, 0.0), atol=1e-3)


@pytest.mark.realdata
def test_realdata_lits117_mrc(lits117_dir):
    vol = read_volume(lits117_dir / "img_117.mrc")
    assert (vol.kind, vol.case_id) == ("mrc", "lits-117")
    assert vol.shape == (128, 128, 128) and vol.spacing == (1.0, 1.0, 1.0)
    assert "spacing_note" in vol.meta
    np.testing.assert_array_equal(np.bincount(vol.label.ravel(), minlength=3), [1_481_801, 485_268, 130_083])
    assert int((vol.label == 2).any(axis=(1, 2)).sum()) == 123  # the last MRC axis is the axial axis
    assert -1100 < vol.image.min() < -1000 and 1800 < vol.image.max() < 1900
    assert find_cases([lits117_dir]) == [lits117_dir]


def test_corrupt_dicom_and_zip(tmp_path):
    folder = _write_oblique_series(tmp_path / "series")
    victim = folder / "IM00.dcm"
    victim.write_bytes(victim.read_bytes()[:-25])  # pixel data cut short
    with pytest.raises(HepasegError, match=r"IM00\.dcm: cannot (read|decode) DICOM"):
        read_volume(folder)

    patient = _write_ircadb(tmp_path / "3Dircadb1.3", zipped=True)
    zipped = patient / "PATIENT_DICOM.zip"
    zipped.write_bytes(zipped.read_bytes()[:1000])
    with pytest.raises(HepasegError, match=r"PATIENT_DICOM\.zip.*(cannot open zip|cannot read zip entry)"):
        read_volume(patient)


def test_mrc_voxel_size_follows_the_transposed_axes(tmp_path):
    # The file's fastest axis (mrcfile's voxel_size.x) is the scan's z after the transpose.
    data = np.zeros((4, 5, 6), np.float32)  # (x, y, z) of the scan: 6 axial slices
    with mrcfile.new(str(tmp_path / "img_3.mrc"), overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = (2.5, 0.8, 0.7)  # (x, y, z) of the FILE = (z, y, x) of the scan
    vol = read_volume(tmp_path / "img_3.mrc", with_label=False)
    assert vol.shape == (6, 5, 4)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert "spacing_note" not in vol.meta
