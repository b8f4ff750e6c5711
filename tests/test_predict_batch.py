"""Batch prediction over a folder of cases, and `hepaseg info`.

The batch runs a real width-4 U-Net checkpoint (untrained: what it predicts does not matter
here) over a folder of three cases, one of them broken, and checks the model is loaded once,
the summary, resuming, and refusals. `hepaseg info` runs on a DICOM study with two phases, a
localiser and a SEG.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import hepaseg.training
from _dicom_data import phantom, write_ct_series, write_seg
from hepaseg.cli import app
from hepaseg.errors import HepasegError
from hepaseg.inference import SUMMARY_COLUMNS, predict_batch
from hepaseg.io import DicomOptions
from hepaseg.io.info import describe_path
from hepaseg.models import build_model

OPTIONS = {"window": [-200.0, 250.0], "size": 32, "context_slices": 0, "slices": "tumor", "target": "tumor"}


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    net = build_model("unet", in_channels=1, num_classes=1, base_width=4)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hepaseg": {"version": "0.1.0", "model": "unet", "model_options": {}, "in_channels": 1,
                            "num_classes": 1, "base_width": 4, "data_options": OPTIONS, "metrics": {}, "config": {}}},
               path)
    return path


def _cases(root: Path) -> Path:
    """A folder of three cases: a LiTS pair (labelled), a DICOM study with a SEG, a truncated NIfTI."""
    image, label = phantom(8, 40, 36)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    root.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0).astype(np.float32), affine), str(root / "volume-1.nii"))
    nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), affine), str(root / "segmentation-1.nii"))
    files = write_ct_series(root / "patient7" / "ct", image, series_uid="1.2.826.0.1.3680043.9.80.1")
    write_seg(root / "patient7" / "seg" / "s.dcm", files, [("Liver", "liver", label > 0),
                                                           ("Tumor", "tumor", label == 2)])
    good = (root / "volume-1.nii").read_bytes()
    (root / "volume-2.nii").write_bytes(good[: len(good) // 3])  # truncated: the broken case
    nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), affine), str(root / "segmentation-2.nii"))
    return root


def _summary(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(SUMMARY_COLUMNS)
    return {r["case"]: r for r in rows}


@pytest.fixture()
def counted_checkpoint(tmp_path, monkeypatch):
    calls = []
    real = hepaseg.training.load_checkpoint

    def load(path, map_location="cpu"):
        calls.append(Path(path))
        return real(path, map_location)

    monkeypatch.setattr(hepaseg.training, "load_checkpoint", load)
    return _checkpoint(tmp_path / "unet.ckpt"), calls


def test_batch_loads_once_reports_the_broken_case_and_resumes(tmp_path, counted_checkpoint):
    ckpt, calls = counted_checkpoint
    cases = _cases(tmp_path / "cases")
    out = tmp_path / "out"
    result = predict_batch(cases, out, checkpoint=ckpt, progress=False, device="cpu")
    assert calls == [ckpt]  # one load for three cases
    assert sorted(result.predicted) == ["lits-1", "patient7"] and result.failed == ["lits-2"]
    rows = _summary(out / "summary.csv")
    assert rows["lits-2"]["status"] == "error" and "volume-2.nii: cannot read NIfTI" in rows["lits-2"]["error"]
    ok = rows["patient7"]
    assert ok["status"] == "ok" and ok["series"] == "#2 ABDOMEN PORTAL (1.2.826.0.1.3680043.9.80.1)"
    assert ok["dice"] != "" and rows["lits-1"]["dice"] != ""  # both labelled: the SEG, the LiTS pair
    lesions = json.loads((out / "patient7" / "lesions.json").read_text())
    assert float(ok["tumor_volume_ml"]) == pytest.approx(sum(r["volume_ml"] for r in lesions["lesions"]), abs=1e-3)
    assert int(ok["lesion_count"]) == len(lesions["lesions"])
    assert (out / "lits-1" / "tumor_mask.nii.gz").is_file() and not (out / "lits-2").exists()
    assert result.cases_per_minute is not None and result.cases_per_minute > 0

    before = (out / "patient7" / "lesions.json").stat().st_mtime_ns
    again = predict_batch(cases, out, checkpoint=ckpt, progress=False, device="cpu")  # resume
    assert sorted(again.skipped) == ["lits-1", "patient7"] and again.failed == ["lits-2"] and not again.predicted
    assert (out / "patient7" / "lesions.json").stat().st_mtime_ns == before  # not predicted again
    rows2 = _summary(out / "summary.csv")
    assert rows2["patient7"]["status"] == "done earlier"
    for key in ("tumor_volume_ml", "lesion_count", "largest_diameter_mm", "dice", "seconds", "series"):
        assert rows2["patient7"][key] == ok[key]
    redo = predict_batch(cases, out, checkpoint=ckpt, progress=False, device="cpu", overwrite=True)
    assert sorted(redo.predicted) == ["lits-1", "patient7"]


def test_batch_refuses_other_settings_and_foreign_folders(tmp_path, counted_checkpoint):
    ckpt, _ = counted_checkpoint
    cases = _cases(tmp_path / "cases")
    out = tmp_path / "out"
    predict_batch(cases, out, checkpoint=ckpt, progress=False, device="cpu")
    with pytest.raises(HepasegError, match=r"out: --out holds a batch made with other settings \(threshold 0\.5 -> "
                                           r"0\.3\): expected the same settings to resume it"):
        predict_batch(cases, out, checkpoint=ckpt, threshold=0.3, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(HepasegError, match=r"foreign: --out holds files hepaseg did not write"):
        predict_batch(cases, foreign, checkpoint=ckpt, progress=False, overwrite=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(HepasegError, match=r"--seg: names the SEG files of one case"):
        predict_batch(cases, tmp_path / "o2", checkpoint=ckpt, dicom=DicomOptions(seg=(cases / "x.dcm",)))


def test_cli_predict_on_a_folder_runs_the_batch(tmp_path, counted_checkpoint):
    ckpt, calls = counted_checkpoint
    cases = _cases(tmp_path / "cases")
    res = CliRunner().invoke(app, ["predict", str(cases), "--out", str(tmp_path / "out"), "--checkpoint", str(ckpt),
                                   "--no-progress"])
    assert res.exit_code == 1, res.output  # a failed case makes the exit status non-zero
    assert "2 predicted, 0 done earlier, 1 failed" in res.output and "failed: lits-2:" in res.output
    assert "cases/min" in res.output and len(calls) == 1


def test_info_on_a_study_folder_lists_series_segs_and_labels(tmp_path):
    image, label = phantom(8)
    root = tmp_path / "study"
    files = write_ct_series(root / "a" / "SE2", image, series_uid="1.2.826.0.1.3680043.9.81.2", number=2,
                            description="PORTAL VENOUS")
    write_ct_series(root / "a" / "SE1", image[:4], series_uid="1.2.826.0.1.3680043.9.81.1", number=1,
                    description="ARTERIAL")
    write_seg(root / "a" / "SEG" / "seg.dcm", files, [("Liver", "liver", label > 0), ("Mass", "tumor", label == 2),
                                                      ("Spleen", "other", np.zeros_like(label))])
    info = describe_path(root)
    (case,) = info["cases"]
    assert case["kind"] == "dicom" and case["shape"] == [8, 40, 36]
    used = [s for s in case["dicom"]["series"] if s["used"]]
    assert [s["number"] for s in used] == [2] and case["dicom"]["choice"].startswith("axial CT with the most")
    (seg,) = case["dicom"]["segs"]
    assert [(s["label"], s["role"]) for s in seg["segments"]] == [("Liver", "liver"), ("Mass", "tumor"),
                                                                   ("Spleen", None)]
    assert seg["used"] and seg["references"] == ["1.2.826.0.1.3680043.9.81.2"]
    counts = np.bincount(label.ravel(), minlength=3)
    assert case["label_counts"] == {"background": int(counts[0]), "liver": int(counts[1]), "tumor": int(counts[2])}
    assert describe_path(root, dicom=DicomOptions(series="1"))["cases"][0]["label_counts"] is None  # SEG: SE2 only

    res = CliRunner().invoke(app, ["info", str(root)])
    assert res.exit_code == 0, res.output
    assert "PORTAL" in res.output and "10:22:00" in res.output and "#1 1.2.826.0.1.3680043.9.81.1\n" in res.output
    assert "'Mass'->tumor" in res.output and f"tumour {int(counts[2]):,}" in res.output
    res = CliRunner().invoke(app, ["info", str(root), "--json"])
    assert json.loads(res.output)["cases"][0]["label_counts"]["liver"] == int(counts[1])
