"""DICOM-SEG labels in: segments mapped to liver/tumour, frames placed by reference or position.

Every SEG here is made with highdicom from a known label map (the synthetic phantom's, or
the real 3D-IRCADb 1.1 masks), so the label read back must equal it voxel for voxel.
"""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from _dicom_data import (
    ircadb_datasets,
    permute_seg_frames,
    phantom,
    write_ct_series,
    write_seg,
    write_series_from,
)
from hepaseg.errors import HepasegError
from hepaseg.io import DicomOptions, read_volume
from hepaseg.io.dicom_seg import parse_seg_labels

SERIES = "1.2.826.0.1.3680043.9.78.1"


@pytest.fixture
def case(tmp_path) -> dict:
    image, label = phantom(10)
    files = write_ct_series(tmp_path / "study" / "CT", image, series_uid=SERIES)
    return {"image": image, "label": label, "files": files, "root": tmp_path / "study"}


def _split_tumour(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tumour = label == 2
    half = np.zeros_like(tumour)
    half[: label.shape[0] // 2] = True
    return tumour & half, tumour & ~half


def test_liver_and_two_tumour_segments_frames_shuffled(case):
    t1, t2 = _split_tumour(case["label"])
    seg = write_seg(case["root"] / "SEG" / "seg.dcm", case["files"],
                    [("Liver", "liver", case["label"] > 0), ("Tumor_1", "tumor", t1), ("Lesion", "tumor", t2)])
    permute_seg_frames(seg, seed=3)
    order = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
             for f in pydicom.dcmread(seg).PerFrameFunctionalGroupsSequence]
    assert order != sorted(order)  # the frames really are out of order
    vol = read_volume(case["root"])
    np.testing.assert_array_equal(vol.label, case["label"])
    assert vol.meta["seg_files"] == [str(seg)] and vol.meta["seg_frames_placed_by"] == ["instance"]
    roles = {s["label"]: s["role"] for s in vol.meta["seg_segments"]}
    assert roles == {"Liver": "liver", "Tumor_1": "tumor", "Lesion": "tumor"}
    assert read_volume(case["root"], with_label=False).label is None


def test_seg_given_with_option_and_partial_coverage(case, tmp_path):
    tumour = case["label"] == 2
    seg = write_seg(tmp_path / "elsewhere" / "tumour_only.dcm", case["files"], [("Mass", "tumor", tumour)])
    assert int(pydicom.dcmread(seg).NumberOfFrames) == int(tumour.any(axis=(1, 2)).sum())  # tumour slices only
    vol = read_volume(case["root"], dicom=DicomOptions(seg=(seg,)))
    np.testing.assert_array_equal(vol.label, np.where(tumour, 2, 0))  # slices without frames: background
    assert vol.meta["seg_roles"] == ["tumor"]


def test_frames_placed_by_plane_position_without_references(case):
    seg = write_seg(case["root"] / "seg.dcm", case["files"], [("Liver", "liver", case["label"] > 0),
                                                             ("Tumour", "tumor", case["label"] == 2)])
    ds = pydicom.dcmread(seg)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
    ds.save_as(seg)
    vol = read_volume(case["root"])
    np.testing.assert_array_equal(vol.label, case["label"])
    assert vol.meta["seg_frames_placed_by"] == ["position"]


def test_fractional_seg_thresholded_at_half(case):
    rng = np.random.default_rng(0)
    prob = rng.uniform(0, 1, case["label"].shape).astype(np.float32)
    seg = write_seg(case["root"] / "frac.dcm", case["files"], [("Tumor", "tumor", prob > 0)], fractional=prob)
    assert pydicom.dcmread(seg).SegmentationType == "FRACTIONAL"
    stored = np.round(prob * 255) / 255  # what an 8-bit FRACTIONAL SEG can hold
    vol = read_volume(case["root"])
    np.testing.assert_array_equal(vol.label == 2, stored >= 0.5)


def test_seg_labels_override(case):
    write_seg(case["root"] / "seg.dcm", case["files"], [("Leber", "liver", case["label"] > 0),
                                                       ("Herd", "tumor", case["label"] == 2)])
    # Labels in another language still map through their coded property types (Liver, Neoplasm) ...
    np.testing.assert_array_equal(read_volume(case["root"]).label, case["label"])
    # ... unless --seg-labels names other segments: then neither label nor type matches.
    with pytest.raises(HepasegError, match=r"seg\.dcm: no liver or tumour segment: expected a segment named Hepar, "
                                           r"Knoten, got segments seg\.dcm: 1 'Leber' \(Liver\); seg\.dcm: 2 'Herd' "
                                           r"\(Neoplasm\)"):
        read_volume(case["root"], dicom=DicomOptions(seg_labels="liver=Hepar;tumor=Knoten"))
    vol = read_volume(case["root"], dicom=DicomOptions(seg_labels="liver=Leber;tumor=Herd"))
    np.testing.assert_array_equal(vol.label, case["label"])
    assert parse_seg_labels("tumour=Mass, Lesion ;")["tumor"] == ("Mass", "Lesion")
    with pytest.raises(HepasegError, match=r"--seg-labels: unknown role 'spleen': expected liver or tumor"):
        parse_seg_labels("spleen=Spleen")
    with pytest.raises(HepasegError, match=r"--seg-labels: 'liver' has no '='"):
        parse_seg_labels("liver")


def test_seg_without_liver_or_tumour_names_its_segments(case):
    write_seg(case["root"] / "organs.dcm", case["files"], [("Spleen", "other", case["label"] > 0)])
    with pytest.raises(HepasegError, match=r"organs\.dcm: no liver or tumour segment: expected a segment named "
                                           r"Liver, Tumor, Tumour, Mass, Lesion, Neoplasm, got segments organs\.dcm: "
                                           r"1 'Spleen' \(Spleen\)\. Map them with --seg-labels"):
        read_volume(case["root"])


def test_seg_of_another_series_is_refused(case, tmp_path):
    other = write_ct_series(tmp_path / "other", case["image"], series_uid="1.2.826.0.1.3680043.9.78.2")
    seg = write_seg(tmp_path / "other_seg.dcm", other, [("Tumor", "tumor", case["label"] == 2)])
    with pytest.raises(HepasegError, match=rf"other_seg\.dcm: SEG references series 1\.2\.826\.0\.1\.3680043\.9\.78\.2"
                                           rf": expected the CT series {SERIES}\. Pass the SEG made on this series"):
        read_volume(case["root"], dicom=DicomOptions(seg=(seg,)))
    # In a study folder, a SEG of another series is not this case's label: it is left aside.
    seg.rename(case["root"] / "other_seg.dcm")
    vol = read_volume(case["root"])
    assert vol.label is None and vol.meta["segs_of_other_series"] == [str(case["root"] / "other_seg.dcm")]


def test_frames_off_the_ct_grid_are_refused(case):
    seg = write_seg(case["root"] / "seg.dcm", case["files"], [("Tumor", "tumor", case["label"] == 2)])
    ds = pydicom.dcmread(seg)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        frame.PlanePositionSequence[0].ImagePositionPatient = [pos[0], pos[1], pos[2] + 1.25]  # half a slice
    ds.save_as(seg)
    with pytest.raises(HepasegError, match=r"seg\.dcm: SEG frame 1 lies at .* 0\.50 slice\(s\), 0\.00 row\(s\), "
                                           r"0\.00 column\(s\) from CT slice \d+: expected frames on the CT grid"):
        read_volume(case["root"])


def test_prepare_reads_a_seg_labelled_study(case, tmp_path):
    from hepaseg.data import prepare

    t1, t2 = _split_tumour(case["label"])
    write_seg(case["root"] / "seg.dcm", case["files"],
              [("Liver", "liver", case["label"] > 0), ("Tumor", "tumor", t1), ("Tumor 2", "tumor", t2)])
    manifest = prepare([case["root"]], tmp_path / "prepared", size=32, split=(1.0, 0.0, 0.0), progress=False)
    (entry,) = manifest["cases"]
    assert entry["kind"] == "dicom" and entry["has_label"]
    assert entry["kept_slices"] == np.flatnonzero((case["label"] == 2).any(axis=(1, 2))).tolist()
    assert json.loads((tmp_path / "prepared" / "manifest.json").read_text())["cases"][0]["tumor_pixels"] > 0


# --------------------------------------------------------------------------------------------
# real data: SEG objects made from the 3D-IRCADb 1.1 masks


@pytest.fixture(scope="module")
def ircadb_seg_case(ircadb_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ircadb-seg") / "study"
    files = write_series_from(ircadb_datasets(ircadb_dir), root / "CT", series_uid="1.2.826.0.1.3680043.9.78.10",
                              number=2, description="ABDOMEN", name=lambda k: f"{(k * 37) % 129:03d}.dcm")
    truth = read_volume(ircadb_dir)  # label from MASKS_DICOM: 1 liver, 2 any livertumorNN
    return {"root": root, "files": files, "label": truth.label}


@pytest.mark.realdata
def test_realdata_seg_from_ircadb_masks_reads_back_voxel_for_voxel(ircadb_seg_case, tmp_path):
    label = ircadb_seg_case["label"]
    components, n = ndimage.label(label == 2)
    assert n >= 2
    sizes = ndimage.sum(np.ones_like(components), components, index=range(1, n + 1))
    largest = components == 1 + int(np.argmax(sizes))
    seg = write_seg(ircadb_seg_case["root"] / "SEG" / "masks.dcm", ircadb_seg_case["files"],
                    [("Liver", "liver", label > 0), ("Tumor 1", "tumor", largest),
                     ("Tumor 2", "tumor", (label == 2) & ~largest)])
    permute_seg_frames(seg, seed=7)
    vol = read_volume(ircadb_seg_case["root"])
    assert vol.shape == (129, 512, 512)
    np.testing.assert_array_equal(vol.label, label)
    assert {s["label"] for s in vol.meta["seg_segments"]} == {"Liver", "Tumor 1", "Tumor 2"}

    only = write_seg(tmp_path / "tumour_slices.dcm", ircadb_seg_case["files"], [("Tumor", "tumor", label == 2)])
    assert int(pydicom.dcmread(only, stop_before_pixels=True).NumberOfFrames) == 74  # the tumour slices
    seg.unlink()
    vol = read_volume(ircadb_seg_case["root"], dicom=DicomOptions(seg=(only,)))
    np.testing.assert_array_equal(vol.label, np.where(label == 2, 2, 0))


def test_evaluate_volumes_explain_and_crossval_reader_take_seg_labels(case, tmp_path):
    """The labelled-case paths of evaluate --volumes, explain and crossval read the SEG (via the CLI options)."""
    import torch
    from typer.testing import CliRunner

    from hepaseg.cli import app
    from hepaseg.experiments.crossval import _read_held_out
    from hepaseg.models import build_model

    seg = write_seg(tmp_path / "labels.dcm", case["files"], [("Liver", "liver", case["label"] > 0),
                                                            ("Lesion 1", "tumor", case["label"] == 2)])
    net = build_model("unet", in_channels=1, num_classes=1, base_width=4)
    ckpt = tmp_path / "unet.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hepaseg": {"version": "0.1.0", "model": "unet", "model_options": {}, "in_channels": 1,
                            "num_classes": 1, "base_width": 4, "metrics": {}, "config": {},
                            "data_options": {"window": [-200.0, 250.0], "size": 32, "context_slices": 0,
                                             "slices": "tumor", "target": "tumor"}}}, ckpt)
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(ckpt), "--volumes", str(case["root"]), "--seg",
                              str(seg), "--series", "2", "--json", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.output)["volumes"]["cases"]
    assert row["target_voxels"] == int((case["label"] == 2).sum())
    z = int(np.flatnonzero((case["label"] == 2).any(axis=(1, 2)))[0])
    res = runner.invoke(app, ["explain", "--checkpoint", str(ckpt), "--input", str(case["root"]), "--slice", str(z),
                              "--out", str(tmp_path / "x.png"), "--seg", str(seg)])
    assert res.exit_code == 0, res.output
    assert "tumour" in res.output  # the default query found a tumour pixel: the SEG was read
    res = runner.invoke(app, ["explain", "--checkpoint", str(ckpt), "--input", str(case["root"]), "--slice", "0",
                              "--out", str(tmp_path / "y.png"), "--seg-labels", "tumor"])
    assert res.exit_code == 1 and "error: --seg-labels: 'tumor' has no '='" in res.output
    seg.rename(case["root"] / "labels.dcm")  # crossval finds each study's SEG in its folder
    held_out = _read_held_out(str(case["root"]), "f0", DicomOptions(seg_labels="tumor=Lesion"))
    np.testing.assert_array_equal(held_out.label, case["label"])  # liver keeps its default name
