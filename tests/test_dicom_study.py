"""DICOM study folders: recursive search, series choice, odd images, compressed pixel data.

Synthetic series (tests/_dicom_data.py) carry a phantom whose slices all differ, so the
image read back is compared with the array written; the real 3D-IRCADb 1.1 slices are
copied into a study folder under tmp_path (realdata tests).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from _dicom_data import (
    ircadb_datasets,
    phantom,
    write_ct_series,
    write_ircadb_study,
    write_series_from,
)
from hepaseg.errors import HepasegError, HepasegWarning
from hepaseg.io import DicomOptions, case_id_of, find_cases, read_volume

PORTAL, ARTERIAL = "1.2.826.0.1.3680043.9.77.5.2", "1.2.826.0.1.3680043.9.77.5.1"


def _study(root: Path) -> dict:
    """Two CT phases and a localiser two folders below ``root``, plus a report and a DICOMDIR."""
    img, _ = phantom(10)
    art, _ = phantom(6, seed=1)
    study = root / "PATIENT" / "STUDY"
    write_ct_series(study / "SE2", img, series_uid=PORTAL, number=2, description="ABDOMEN PORTAL",
                    name=lambda k: f"{k * 7 % 10}")  # no extension, name order != slice order
    write_ct_series(study / "SE1", art, series_uid=ARTERIAL, number=1, description="ABDOMEN ARTERIAL")
    write_ct_series(study / "SE9", phantom(1)[0], series_uid="1.2.826.0.1.3680043.9.77.5.9", number=9,
                    description="Topogram", iop=(1, 0, 0, 0, 0, -1), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    report = pydicom.Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    report.SOPInstanceUID, report.Modality = "1.2.3.4.5", "SR"
    report.save_as(study / "SE2" / "dose.dcm", implicit_vr=True, little_endian=True)  # no preamble either
    (root / "DICOMDIR").write_bytes(b"DICM" * 50)
    return {"image": img, "arterial": art, "study": study}


def test_study_folder_two_levels_down_default_series(tmp_path):
    made = _study(tmp_path / "export")
    root = tmp_path / "export"
    assert find_cases([root]) == [made["study"]]  # one study = one case, at the folder holding its series
    assert case_id_of(root) == "export"
    vol = read_volume(root)
    assert vol.kind == "dicom" and vol.shape == made["image"].shape
    np.testing.assert_array_equal(vol.image, made["image"].astype(np.float32))
    assert vol.meta["series"]["uid"] == PORTAL
    assert vol.meta["series_choice"] == "axial CT with the most images (10; 3 series found)"
    assert vol.meta["skipped_objects"] == {"structured report": 1}
    assert vol.label is None  # no SEG in the study
    assert vol.meta["sop_instance_uids"] == [f"{PORTAL}.{k + 1}" for k in range(10)]


@pytest.mark.parametrize(
    ("series", "uid", "how"),
    [("1", ARTERIAL, "SeriesNumber"), ("arterial", ARTERIAL, "description"), (PORTAL, PORTAL, "SeriesInstanceUID")],
)
def test_series_option_picks_by_number_text_or_uid(tmp_path, series, uid, how):
    made = _study(tmp_path / "export")
    vol = read_volume(tmp_path / "export", dicom=DicomOptions(series=series))
    assert vol.meta["series"]["uid"] == uid
    assert vol.meta["series_choice"] == f"--series {series!r} matched its {how}"
    expected = made["arterial"] if uid == ARTERIAL else made["image"]
    np.testing.assert_array_equal(vol.image, expected.astype(np.float32))


def test_series_option_errors_list_the_series(tmp_path):
    _study(tmp_path / "export")
    with pytest.raises(HepasegError, match=r"--series 'venous': matches none in .*#2 'ABDOMEN PORTAL' \(CT, 10 "
                                           r"images, axial.*#9 'Topogram' .*localiser"):
        read_volume(tmp_path / "export", dicom=DicomOptions(series="venous"))
    with pytest.raises(HepasegError, match=r"--series 'abdomen': matches 2 series"):
        read_volume(tmp_path / "export", dicom=DicomOptions(series="abdomen"))


def test_equal_phases_tie_goes_to_the_later_series(tmp_path):
    img, _ = phantom(6)
    write_ct_series(tmp_path / "s" / "a", img, series_uid="1.2.3.1", number=3, description="ARTERIAL")
    write_ct_series(tmp_path / "s" / "b", img + 5, series_uid="1.2.3.2", number=4, description="PORTAL VENOUS")
    vol = read_volume(tmp_path / "s")
    assert vol.meta["series"]["uid"] == "1.2.3.2" and vol.meta["series"]["phase"] == "portal venous"
    assert "tied" in vol.meta["series_choice"]


def test_folder_of_studies_is_one_case_per_study(tmp_path):
    img, _ = phantom(5)
    for p in ("p1", "p2"):
        write_ct_series(tmp_path / "batch" / p / "ct" / "series", img, series_uid=f"1.2.9.{p[1]}",
                        study_uid=f"1.2.8.{p[1]}")
    cases = find_cases([tmp_path / "batch"])
    assert cases == [tmp_path / "batch" / "p1" / "ct" / "series", tmp_path / "batch" / "p2" / "ct" / "series"]
    with pytest.raises(HepasegError, match=r"batch: holds 2 cases \(series, series\): expected one case"):
        read_volume(tmp_path / "batch")
    assert read_volume(tmp_path / "batch" / "p2").shape == img.shape


def test_odd_images_are_dropped_with_a_warning_naming_each_file(tmp_path):
    img, _ = phantom(8)
    folder = tmp_path / "series"
    uid = "1.2.3.50"
    write_ct_series(folder, img, series_uid=uid)
    # a coronal reformat sharing the series UID, a scout, and a slice off the 2.5 mm grid
    write_ct_series(folder, img[:1], series_uid=uid, iop=(1, 0, 0, 0, 0, -1), name=lambda k: "reformat.dcm")
    write_ct_series(folder, img[:1], series_uid=uid, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                    name=lambda k: "scout.dcm")
    write_ct_series(folder, img[:1] + 7, series_uid=uid, positions=[7 * 2.5 + 31.3], name=lambda k: "stray.dcm")
    with pytest.warns(HepasegWarning) as caught:
        vol = read_volume(folder)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3
    assert re.search(r"reformat\.dcm: dropped from the series: orientation coronal .* differs from the series' axial",
                     messages[0])
    assert re.search(r"scout\.dcm: dropped from the series: localiser/scout image", messages[1])
    assert re.search(r"stray\.dcm: dropped from the series: isolated slice at 148\.8\d mm, off the series' regular "
                     r"grid", messages[2])
    np.testing.assert_array_equal(vol.image, img.astype(np.float32))
    assert len(vol.meta["warnings"]) == 3 and len(vol.meta["dropped_images"]) == 3


def test_a_gap_inside_the_series_is_still_an_error(tmp_path):
    img, _ = phantom(8)
    files = write_ct_series(tmp_path / "gap", img, series_uid="1.2.3.60")
    files[4].unlink()
    with pytest.raises(HepasegError, match=r"gap: uneven slice positions: expected a constant step, got steps "
                                           r"2\.500\.\.5\.000 mm"):
        read_volume(tmp_path / "gap")


def test_rle_compressed_series_reads_like_the_uncompressed_one(tmp_path):
    img, _ = phantom(6)
    files = write_ct_series(tmp_path / "rle", img, series_uid="1.2.3.70")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(f)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    vol = read_volume(tmp_path / "rle")
    np.testing.assert_array_equal(vol.image, img.astype(np.float32))


def test_missing_decoder_names_the_dicom_extra(tmp_path):
    """JPEG-LS decodes only through the plugins; with them hidden, the error names the extra."""
    img, _ = phantom(3)
    files = write_ct_series(tmp_path / "jls", img, series_uid="1.2.3.80")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(pydicom.uid.JPEGLSLossless)  # encoded by pyjpegls (a highdicom dependency)
        ds.save_as(f)
    np.testing.assert_array_equal(read_volume(tmp_path / "jls").image, img.astype(np.float32))  # plugins present
    code = (
        "import sys\n"
        "for m in ('pylibjpeg', 'libjpeg', 'openjpeg', 'rle', 'jpeg_ls', 'gdcm'): sys.modules[m] = None\n"
        "from hepaseg.io import read_volume\n"
        "from hepaseg.errors import HepasegError\n"
        f"try:\n    read_volume({str(tmp_path / 'jls')!r})\n"
        "except HepasegError as e:\n    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80) needs a decoder plugin that is not " \
           "installed: expected hepaseg's dicom extra. Install it: pip install 'hepaseg[dicom]'" in out.stdout, \
        out.stdout + out.stderr


# --------------------------------------------------------------------------------------------
# real data: 3D-IRCADb 1.1 copied into a study folder


@pytest.fixture(scope="module")
def ircadb_study(ircadb_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ircadb-study") / "export"
    return {"root": root, **write_ircadb_study(root, ircadb_dir)}


@pytest.mark.realdata
def test_realdata_study_folder_picks_the_portal_series(ircadb_study, ircadb_dir):
    reference = read_volume(ircadb_dir, with_label=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HepasegWarning)  # nothing to drop in a clean export
        vol = read_volume(ircadb_study["root"])
    assert vol.meta["series"]["uid"] == ircadb_study["portal_uid"]
    assert vol.meta["series_choice"] == "axial CT with the most images (129; 3 series found)"
    np.testing.assert_array_equal(vol.image, reference.image)
    np.testing.assert_allclose(vol.affine, reference.affine)
    art = read_volume(ircadb_study["root"], dicom=DicomOptions(series="ARTERIAL"))
    assert art.shape == (65, 512, 512)
    np.testing.assert_allclose(art.spacing, (3.2, 0.57, 0.57), atol=1e-4)
    np.testing.assert_array_equal(art.image, reference.image[::2])


@pytest.mark.realdata
def test_realdata_stray_slice_and_reformat_dropped(ircadb_dir, tmp_path):
    source = ircadb_datasets(ircadb_dir)
    folder = tmp_path / "series"
    uid = "1.2.826.0.1.3680043.9.77.6"
    write_series_from(source[:40], folder, series_uid=uid, number=3, description="stray test")
    stray = source[40].copy()
    stray.ImagePositionPatient = [0.0, 0.0, 1.6 * 39 + 23.3]  # off the 1.6 mm grid, beyond the end
    write_series_from([stray], folder, series_uid=uid, number=3, description="stray test",
                      name=lambda k: "stray_slice")
    reformat = source[41].copy()
    reformat.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    write_series_from([reformat], folder, series_uid=uid, number=3, description="stray test",
                      name=lambda k: "coronal_reformat")
    with pytest.warns(HepasegWarning) as caught:
        vol = read_volume(folder)
    assert sorted(Path(str(w.message).split(":")[0]).name for w in caught) == ["coronal_reformat", "stray_slice"]
    assert vol.shape == (40, 512, 512)
    np.testing.assert_array_equal(vol.image, read_volume(ircadb_dir, with_label=False).image[:40])


@pytest.mark.realdata
def test_realdata_rle_copy_equals_the_original(ircadb_dir, tmp_path):
    source = ircadb_datasets(ircadb_dir)[50:70]
    files = write_series_from(source, tmp_path / "rle", series_uid="1.2.826.0.1.3680043.9.77.7", number=4,
                              description="RLE")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(pydicom.uid.RLELossless, encoding_plugin="pylibjpeg")
        ds.save_as(f)
    assert all(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
               for f in files)
    vol = read_volume(tmp_path / "rle")
    np.testing.assert_array_equal(vol.image, read_volume(ircadb_dir, with_label=False).image[50:70])

