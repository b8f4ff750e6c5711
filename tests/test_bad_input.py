"""The bad-input catalogue: every refused input of every command, through the real CLI.

Each case runs ``hepaseg ...`` (typer's CliRunner, in process) and asserts what the developers'
brief promises for bad input:

* a non-zero exit status and no Python traceback (nor any exception other than the exit);
* exactly one line on stderr starting with ``error:``, naming the file or option at fault;
* nothing half-written: the case's output folder (everything the command could write to,
  hidden temporary folders included) is byte-identical before and after;
* every input byte-identical afterwards (sha256 of every file under the inputs folder).

The cases gather issue 9's hardening items (overwrite safety, non-finite voxels, zero/singular
geometry, impossible output paths, checkpoint loading, one threshold rule) and the bad inputs of
the earlier issues that other modules test at the library level. ``SIGTERM`` cases need a real
subprocess and live in test_training.py / test_inference.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mrcfile
import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from typer.testing import CliRunner

from _tiny_data import make_tiny_dataset
from hepaseg.cli import app
from hepaseg.data.phantom import make_phantom, write_phantom_dataset
from hepaseg.io import OUTPUT_MARKER, Volume, write_image_nifti
from hepaseg.models import build_model

SHAPE = (12, 32, 32)  # (z, y, x) of every phantom case


# --- the inputs every case may use (module scope, never written by any case) --------------------


def _checkpoint(path: Path, *, model: str = "unet", k: int = 1, **data_options) -> Path:
    """A hepaseg checkpoint (untrained width-4 network) with the tiny dataset's data options."""
    torch.manual_seed(0)
    net = build_model(model, in_channels=2 * k + 1, num_classes=1, base_width=4)
    options = {"window": [-100, 200], "size": 32, "context_slices": k, "slices": "all", "target": "tumor",
               **data_options}
    torch.save({
        "state_dict": {f"net.{key}": value for key, value in net.state_dict().items()},
        "hepaseg": {"version": "0.1.0", "model": model, "model_options": {}, "in_channels": 2 * k + 1,
                    "num_classes": 1, "base_width": 4, "data_options": options, "metrics": {}, "config": {}},
    }, path)
    return path


def _nifti(path: Path, image_zyx: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.asarray(image_zyx).transpose(2, 1, 0)), affine), str(path))
    return path


def _dicom_series(folder: Path, *, modality: str = "CT", pixel_spacing=(0.8, 0.8)) -> Path:
    """Three axial CT slices of air and soft tissue (int16 stored values, HU = stored - 1024)."""
    folder.mkdir(parents=True)
    for k in range(3):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.9.9.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.9", "1.2.826.0.1.3680043.9.9.0"
        ds.Modality, ds.InstanceNumber = modality, k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 2.5 * k], [1.0, 0, 0, 0, 1.0, 0]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        pixels = np.full((8, 8), 1024 + 40, "<i2")
        pixels[:2] = 24  # air: -1000 HU
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.PixelData = pixels.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        (folder / f"IM{k:02d}.dcm").write_bytes(buf.getvalue())
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Every input of the catalogue, under ``W["in"]``; keys are the ``{placeholders}`` of the cases."""
    inp = tmp_path_factory.mktemp("catalogue") / "in"
    w: dict[str, Path] = {"in": inp}
    w["lits"] = inp / "lits"
    write_phantom_dataset(w["lits"], "lits", n_cases=2, shape=SHAPE, seed=1, n_tumors=1)
    w["case"] = w["lits"] / "volume-0.nii.gz"
    w["one"] = inp / "one"
    write_phantom_dataset(w["one"], "lits", n_cases=1, shape=SHAPE, seed=2, n_tumors=1)
    phantom = make_phantom(SHAPE, n_tumors=1, seed=3)
    w["plain"] = write_image_nifti(phantom, inp / "plain.nii.gz")
    image = phantom.image.copy()
    image[3, 10:12, 10:13] = np.nan  # 6 NaN voxels
    nan = Volume(image=image, spacing=phantom.spacing, affine=phantom.affine)
    w["nan"] = write_image_nifti(nan, inp / "nan.nii.gz")
    image = phantom.image.copy()
    image[5, 0, :4] = np.inf
    w["inf"] = inp / "inf" / "volume-5.nii.gz"
    _nifti(w["inf"], image)
    _nifti(inp / "inf" / "segmentation-5.nii.gz", phantom.label)
    # pixdim 0 and no sform/qform, as some exporters write: nibabel's loader reads it as 1 mm.
    w["zero"] = _nifti(inp / "zero.nii", phantom.image)
    header = bytearray(w["zero"].read_bytes())
    header[80:92] = np.zeros(3, "<f4").tobytes()  # pixdim[1:4] (NIfTI-1 offset 76 + 4)
    header[252:256] = np.zeros(2, "<i2").tobytes()  # qform_code, sform_code
    w["zero"].write_bytes(bytes(header))
    assert nib.load(w["zero"]).header.get_zooms() == (1.0, 1.0, 1.0)  # the silent repair the check must see through
    singular = nib.Nifti1Image(np.ascontiguousarray(phantom.image.transpose(2, 1, 0)), np.eye(4))
    singular.set_sform(np.diag([0.8, 0.8, 0.0, 1.0]), code=2)  # the z axis collapsed
    w["singular"] = inp / "singular.nii.gz"
    nib.save(singular, str(w["singular"]))
    w["mri"] = _nifti(inp / "mri.nii.gz", np.random.default_rng(0).uniform(0, 900, SHAPE).astype(np.float32))
    w["flat"] = _nifti(inp / "flat.nii.gz", np.full((1, 32, 32), -1000.0, np.float32))
    w["fourd"] = inp / "fourd.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 12, 2), np.float32), np.eye(4)), str(w["fourd"]))
    w["thin"] = _nifti(inp / "thin.nii.gz", np.full((4, 32, 32), -1000.0, np.float32))
    w["badlabel"] = inp / "badlabel" / "volume-3.nii.gz"
    _nifti(w["badlabel"], phantom.image)
    _nifti(inp / "badlabel" / "segmentation-3.nii.gz", np.where(phantom.label > 0, 7, 0).astype(np.uint8))
    w["shapelabel"] = inp / "shapelabel" / "volume-4.nii.gz"
    _nifti(w["shapelabel"], phantom.image)
    _nifti(inp / "shapelabel" / "segmentation-4.nii.gz", phantom.label[:6])
    data = w["case"].read_bytes()
    w["truncated"] = inp / "truncated.nii.gz"
    w["truncated"].write_bytes(data[: len(data) // 2])
    w["mrcnan"] = inp / "mrcnan"
    w["mrcnan"].mkdir()
    with mrcfile.new(str(w["mrcnan"] / "img_9.mrc")) as m:
        m.set_data(np.where(np.arange(np.prod(SHAPE)).reshape(SHAPE) == 7, np.nan, -500).astype(np.float32))
    with mrcfile.new(str(w["mrcnan"] / "lab_9.mrc")) as m:
        m.set_data(np.zeros(SHAPE, np.uint8))
    w["mr"] = _dicom_series(inp / "mr", modality="MR")
    w["dicomzero"] = _dicom_series(inp / "dicomzero", pixel_spacing=(0.0, 0.8))
    w["junk"] = inp / "junk"
    w["junk"].mkdir()
    (w["junk"] / "a.txt").write_text("not a scan")
    w["empty"] = inp / "empty"
    w["empty"].mkdir()
    w["data"] = make_tiny_dataset(inp / "data")
    w["data16"] = make_tiny_dataset(inp / "data16", size=16)
    w["ckpt"] = _checkpoint(inp / "m.ckpt")
    w["ckpt2"] = _checkpoint(inp / "k2.ckpt", k=2)  # 5 channels: needs at least 5 slices
    w["liver"] = _checkpoint(inp / "liver.ckpt", target="liver")
    w["roi"] = _checkpoint(inp / "roi.ckpt", roi="liver", roi_margin_mm=10.0)
    w["half"] = inp / "half.ckpt"
    w["half"].write_bytes(w["ckpt"].read_bytes()[:2000])
    w["foreign"] = inp / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, w["foreign"])
    unsafe = torch.load(w["ckpt"], weights_only=True)
    unsafe["hepaseg"]["extra"] = Path("x")  # a pickled object: weights-only loading refuses it
    w["unsafe"] = inp / "unsafe.ckpt"
    torch.save(unsafe, w["unsafe"])
    w["badonnx"] = inp / "bad.onnx"
    w["badonnx"].write_bytes(b"this is not protobuf at all")
    w["splitunknown"] = inp / "split_unknown.json"
    w["splitunknown"].write_text(json.dumps({"train": ["lits-0", "lits-1", "nobody"], "val": [], "test": []}))
    w["splitbroken"] = inp / "split_broken.json"
    w["splitbroken"].write_text("{not json")
    return w


# --- what a case may find in its output folder before it runs ---------------------------------


def _mine(o: Path) -> None:
    """A user's folder whose files merely look like hepaseg's (issue 9 items 1 and 2)."""
    (o / "mine" / "sub").mkdir(parents=True)
    for name, text in (("notes.txt", "precious"), ("config.json", "{}"), ("last.ckpt", "not ours"),
                       ("manifest.json", "{}"), ("sub/thesis.tex", "precious")):
        (o / "mine" / name).write_text(text)


def _marked(command: str, *files: str) -> Callable[[Path], None]:
    def setup(o: Path) -> None:
        folder = o / "prev"
        folder.mkdir()
        (folder / OUTPUT_MARKER).write_text(json.dumps({"format": "hepaseg-output/1", "command": command,
                                                         "hepaseg_version": "0.1.0"}))
        for name in files:
            (folder / name).write_text("earlier output")
    return setup


def _afile(o: Path) -> None:
    (o / "afile").write_text("a file, not a folder")


def _folder(o: Path) -> None:
    (o / "folder").mkdir()
    (o / "f.png").mkdir()


def _foreign_onnx(o: Path) -> None:
    (o / "model.onnx").write_text("the user's own model, not from hepaseg export")


def _compare_protocol(o: Path) -> None:
    _marked("compare")(o)
    (o / "prev" / "protocol.json").write_text(json.dumps({"data": "/elsewhere/data", "width": 999}))


def _readonly(o: Path) -> None:
    (o / "ro").mkdir()
    (o / "ro").chmod(0o555)


@dataclass(frozen=True)
class Case:
    id: str
    args: str  # the command line; {name} are world paths, {o} the case's output folder
    names: str  # the file or option the error line must name
    setup: Callable[[Path], None] | None = None


P = "--no-progress"
CASES = [
    # prepare: options (issue 1)
    Case("prepare-window-order", "prepare {lits} --out {o}/p --window 300,-100", "--window"),
    Case("prepare-window-text", "prepare {lits} --out {o}/p --window soft", "--window"),
    Case("prepare-split-two-numbers", "prepare {lits} --out {o}/p --split 0.7,0.3", "--split"),
    Case("prepare-size-zero", "prepare {lits} --out {o}/p --size 0", "--size"),
    Case("prepare-slices-unknown", "prepare {lits} --out {o}/p --slices lungs", "--slices"),
    Case("prepare-context-negative", "prepare {lits} --out {o}/p --context-slices -1", "--context-slices"),
    Case("prepare-target-unknown", "prepare {lits} --out {o}/p --target lung", "--target"),
    Case("prepare-roi-unknown", "prepare {lits} --out {o}/p --roi tumor", "--roi"),
    Case("prepare-roi-with-liver-target", "prepare {lits} --out {o}/p --roi liver --target liver", "--roi liver"),
    Case("prepare-roi-margin-negative", "prepare {lits} --out {o}/p --roi liver --roi-margin -1", "--roi-margin"),
    Case("prepare-z-split-many-cases", "prepare {lits} --out {o}/p --z-split 0.6,0.2,0.2", "--z-split"),
    Case("prepare-split-file-unknown-id", "prepare {lits} --out {o}/p --split-file {splitunknown}", "{splitunknown}"),
    Case("prepare-split-file-not-json", "prepare {lits} --out {o}/p --split-file {splitbroken}", "{splitbroken}"),
    # prepare: sources (issues 1, 2)
    Case("prepare-source-missing", "prepare {in}/nope --out {o}/p", "{in}/nope"),
    Case("prepare-source-empty-folder", "prepare {empty} --out {o}/p", "{empty}"),
    Case("prepare-source-no-ct", "prepare {junk} --out {o}/p", "{junk}"),
    Case("prepare-unlabelled-tumor-slices", "prepare {plain} --out {o}/p", "{plain}"),
    Case("prepare-unlabelled-roi", "prepare {plain} --out {o}/p --roi liver --slices all", "{plain}"),
    Case("prepare-label-values", "prepare {badlabel} --out {o}/p", "segmentation-3.nii.gz"),
    Case("prepare-label-shape", "prepare {shapelabel} --out {o}/p", "segmentation-4.nii.gz"),
    Case("prepare-truncated-nifti", "prepare {truncated} --out {o}/p --slices all", "{truncated}"),
    Case("prepare-single-slice", "prepare {flat} --out {o}/p --slices all", "{flat}"),
    Case("prepare-4d", "prepare {fourd} --out {o}/p --slices all", "{fourd}"),
    Case("prepare-dicom-not-ct", "prepare {mr} --out {o}/p --slices all", ".dcm"),
    # prepare: voxels and geometry (issue 9 items 3, 4)
    Case("prepare-nan-voxels", "prepare {nan} --out {o}/p --slices all", "{nan}: image holds 6 NaN/inf"),
    Case("prepare-inf-voxels-lits", "prepare {inf} --out {o}/p", "{inf}: image holds 4 NaN/inf"),
    Case("prepare-nan-voxels-mrc", "prepare {mrcnan} --out {o}/p --slices all", "img_9.mrc: image holds 1 NaN/inf"),
    Case("prepare-zero-pixdim", "prepare {zero} --out {o}/p --slices all", "{zero}: header voxel size pixdim"),
    Case("prepare-singular-affine", "prepare {singular} --out {o}/p --slices all", "{singular}: voxel-to-world"),
    Case("prepare-dicom-zero-spacing", "prepare {dicomzero} --out {o}/p --slices all", "{dicomzero}"),
    # prepare: outputs (issue 9 items 1, 2, 5)
    Case("prepare-out-foreign-overwrite", "prepare {lits} --out {o}/mine --overwrite", "{o}/mine", _mine),
    Case("prepare-out-earlier-no-overwrite", "prepare {lits} --out {o}/prev", "--overwrite",
         _marked("prepare", "manifest.json")),
    Case("prepare-out-other-command", "prepare {lits} --out {o}/prev --overwrite", "hepaseg predict",
         _marked("predict", "tumor_mask.nii.gz")),
    Case("prepare-out-is-source", "prepare {lits} --out {lits} --overwrite", "--out is the input"),
    Case("prepare-out-contains-source", "prepare {lits} --out {in} --overwrite", "--out contains the input"),
    Case("prepare-out-inside-source", "prepare {lits} --out {lits}/prepared", "--out is inside the input"),
    Case("prepare-out-is-file", "prepare {lits} --out {o}/afile", "{o}/afile", _afile),
    Case("prepare-out-under-file", "prepare {lits} --out {o}/afile/p", "is a file, not a folder", _afile),
    Case("prepare-out-read-only", "prepare {lits} --out {o}/ro/p", "cannot write in", _readonly),
    # sample (issue 2)
    Case("sample-unknown-name", "sample lits999 --dest {o}/s", "sample name"),
    Case("sample-from-dir-missing", "sample lits117 --dest {o}/s --from-dir {in}/nope", "--from-dir"),
    Case("sample-from-dir-without-files", "sample lits117 --dest {o}/s --from-dir {empty}", "img_117.mrc"),
    Case("sample-dest-is-from-dir", "sample lits117 --dest {empty} --from-dir {empty}", "--dest is the input"),
    Case("sample-dest-is-file", "sample lits117 --dest {o}/afile --from-dir {empty}", "--dest", _afile),
    # models (issue 3)
    Case("models-width-zero", "models --width 0", "width"),
    # train (issues 4, 5, 9)
    Case("train-data-missing", "train --data {in}/nope --model unet --out {o}/r", "manifest"),
    Case("train-model-unknown", "train --data {data} --model vnet --out {o}/r", "unknown model 'vnet'"),
    Case("train-model-option-unparsable", "train --data {data} --model unet --out {o}/r --model-option depth",
         "--model-option"),
    Case("train-model-option-unknown", "train --data {data} --model unet --out {o}/r --model-option nope=3",
         "unet"),
    Case("train-loss-unknown", "train --data {data} --model unet --out {o}/r --loss l2", "--loss"),
    Case("train-precision-unknown", "train --data {data} --model unet --out {o}/r --precision 64", "--precision"),
    Case("train-augment-unknown", "train --data {data} --model unet --out {o}/r --augment heavy", "--augment"),
    Case("train-no-aug-unknown", "train --data {data} --model unet --out {o}/r --no-aug colour", "--no-aug"),
    Case("train-synthetic-probability", "train --data {data} --model unet --out {o}/r --synthetic-tumors 2",
         "--synthetic-tumors"),
    Case("train-crop-zero", "train --data {data} --model unet --out {o}/r --crop 0", "--crop"),
    Case("train-crop-larger-than-slices", "train --data {data} --model unet --width 4 --out {o}/r --crop 64",
         "--crop"),
    Case("train-tumor-crop-without-crop", "train --data {data} --model unet --out {o}/r --tumor-crop-fraction 0.5",
         "--tumor-crop-fraction"),
    Case("train-resume-without-run", "train --data {data} --model unet --width 4 --out {o}/r --resume",
         "--resume"),
    Case("train-resume-and-overwrite", "train --data {data} --model unet --out {o}/r --resume --overwrite",
         "--resume and --overwrite"),
    Case("train-out-foreign-overwrite", "train --data {data} --model unet --width 4 --out {o}/mine --overwrite",
         "{o}/mine", _mine),
    Case("train-out-earlier-run", "train --data {data} --model unet --width 4 --out {o}/prev", "--resume",
         _marked("train", "config.json", "last.ckpt")),
    Case("train-out-is-data", "train --data {data} --model unet --width 4 --out {data} --overwrite",
         "--out is the input"),
    Case("train-out-inside-data", "train --data {data} --model unet --width 4 --out {data}/run",
         "--out is inside the input"),
    Case("train-out-under-file", "train --data {data} --model unet --width 4 --out {o}/afile/r",
         "is a file, not a folder", _afile),
    # evaluate (issues 4, 6, 9)
    Case("evaluate-checkpoint-missing", "evaluate --checkpoint {in}/none.ckpt --data {data} --out {o}/e",
         "{in}/none.ckpt"),
    Case("evaluate-nothing-to-score", "evaluate --checkpoint {ckpt} --out {o}/e", "--data"),
    Case("evaluate-liver-checkpoint-without-volumes",
         "evaluate --checkpoint {ckpt} --data {data} --liver-checkpoint {liver} --out {o}/e", "--liver-checkpoint"),
    Case("evaluate-split-unknown", "evaluate --checkpoint {ckpt} --data {data} --split testing --out {o}/e",
         "--split"),
    Case("evaluate-threshold-zero", "evaluate --checkpoint {ckpt} --data {data} --threshold 0 --out {o}/e",
         "--threshold"),
    Case("evaluate-threshold-one", "evaluate --checkpoint {ckpt} --data {data} --threshold 1 --out {o}/e",
         "--threshold"),
    Case("evaluate-threshold-above-one", "evaluate --checkpoint {ckpt} --data {data} --threshold 1.5 --out {o}/e",
         "--threshold"),
    Case("evaluate-volumes-threshold-zero",
         "evaluate --checkpoint {ckpt} --volumes {lits} --threshold 0 --out {o}/e", "--threshold"),
    Case("evaluate-batch-zero", "evaluate --checkpoint {ckpt} --data {data} --batch 0 --out {o}/e", "--batch"),
    Case("evaluate-data-missing", "evaluate --checkpoint {ckpt} --data {in}/nope --out {o}/e", "{in}/nope"),
    Case("evaluate-data-options-differ", "evaluate --checkpoint {ckpt} --data {data16} --out {o}/e", "size"),
    Case("evaluate-checkpoint-truncated", "evaluate --checkpoint {half} --data {data} --out {o}/e",
         "{half}: cannot read checkpoint"),
    Case("evaluate-checkpoint-foreign", "evaluate --checkpoint {foreign} --data {data} --out {o}/e",
         "{foreign}: not a hepaseg checkpoint"),
    Case("evaluate-checkpoint-unpicklable", "evaluate --checkpoint {unsafe} --data {data} --out {o}/e",
         "{unsafe}: checkpoint holds non-tensor Python objects"),
    Case("evaluate-roi-checkpoint-without-liver", "evaluate --checkpoint {roi} --volumes {lits} --out {o}/e",
         "--liver-checkpoint"),
    Case("evaluate-out-foreign", "evaluate --checkpoint {ckpt} --data {data} --out {o}/mine", "{o}/mine", _mine),
    Case("evaluate-out-other-command", "evaluate --checkpoint {ckpt} --data {data} --out {o}/prev",
         "hepaseg train", _marked("train", "config.json")),
    Case("evaluate-out-is-data", "evaluate --checkpoint {ckpt} --data {data} --out {data}", "--out is the input"),
    Case("evaluate-out-is-file", "evaluate --checkpoint {ckpt} --data {data} --out {o}/afile", "{o}/afile", _afile),
    # compare (issue 5)
    Case("compare-model-unknown", "compare --data {data} --models unet,foo --out {o}/c", "unknown model 'foo'"),
    Case("compare-seeds-zero", "compare --data {data} --seeds 0 --out {o}/c", "--seeds"),
    Case("compare-data-missing", "compare --data {in}/nope --out {o}/c", "{in}/nope"),
    Case("compare-protocol-differs",
         "compare --data {data} --models unet --seeds 1 --width 4 --split val --out {o}/prev",
         "protocol.json: data differs", _compare_protocol),
    Case("compare-out-foreign", "compare --data {data} --models unet --out {o}/mine", "{o}/mine", _mine),
    Case("compare-out-contains-data", "compare --data {data} --models unet --out {in}", "--out contains the input"),
    # predict (issues 3, 6, 7, 9)
    Case("predict-engine-unknown", "predict {case} --checkpoint {ckpt} --out {o}/pr --engine tf", "--engine"),
    Case("predict-onnx-without-model", "predict {case} --engine onnx --out {o}/pr", "--model"),
    Case("predict-no-checkpoint", "predict {case} --out {o}/pr", "--checkpoint"),
    Case("predict-labels-unknown", "predict {case} --checkpoint {ckpt} --out {o}/pr --labels liver", "--labels"),
    Case("predict-threshold-zero", "predict {case} --checkpoint {ckpt} --out {o}/pr --threshold 0", "--threshold"),
    Case("predict-threshold-one", "predict {case} --checkpoint {ckpt} --out {o}/pr --threshold 1", "--threshold"),
    Case("predict-batch-zero", f"predict {{case}} --checkpoint {{ckpt}} --out {{o}}/pr --batch 0 {P}", "--batch"),
    Case("predict-lits-labels-unlabelled", f"predict {{plain}} --checkpoint {{ckpt}} --out {{o}}/pr --labels lits {P}",
         "--labels lits"),
    Case("predict-input-missing", f"predict {{in}}/nope.nii.gz --checkpoint {{ckpt}} --out {{o}}/pr {P}",
         "{in}/nope.nii.gz"),
    Case("predict-not-ct", f"predict {{mri}} --checkpoint {{ckpt}} --out {{o}}/pr {P}", "{mri}: does not look like CT"),
    Case("predict-single-slice", f"predict {{flat}} --checkpoint {{ckpt}} --out {{o}}/pr {P}", "{flat}"),
    Case("predict-too-thin-for-context", f"predict {{thin}} --checkpoint {{ckpt2}} --out {{o}}/pr {P}", "{thin}"),
    Case("predict-nan-voxels", f"predict {{nan}} --checkpoint {{ckpt}} --out {{o}}/pr {P}", "{nan}: image holds 6"),
    Case("predict-zero-pixdim", f"predict {{zero}} --checkpoint {{ckpt}} --out {{o}}/pr {P}", "{zero}: header voxel"),
    Case("predict-singular-affine", f"predict {{singular}} --checkpoint {{ckpt}} --out {{o}}/pr {P}",
         "{singular}: voxel-to-world affine is singular"),
    Case("predict-checkpoint-truncated", f"predict {{case}} --checkpoint {{half}} --out {{o}}/pr {P}", "{half}"),
    Case("predict-checkpoint-unpicklable", f"predict {{case}} --checkpoint {{unsafe}} --out {{o}}/pr {P}",
         "{unsafe}: checkpoint holds non-tensor"),
    Case("predict-onnx-corrupt", f"predict {{case}} --engine onnx --model {{badonnx}} --out {{o}}/pr {P}",
         "{badonnx}"),
    Case("predict-roi-without-liver", f"predict {{case}} --checkpoint {{roi}} --out {{o}}/pr {P}",
         "--liver-checkpoint"),
    Case("predict-cascade-swapped", f"predict {{case}} --checkpoint {{liver}} --liver-checkpoint {{ckpt}} "
         f"--out {{o}}/pr {P}", "--liver-checkpoint"),
    Case("predict-out-foreign-overwrite", f"predict {{case}} --checkpoint {{ckpt}} --out {{o}}/mine --overwrite {P}",
         "{o}/mine", _mine),
    Case("predict-out-earlier-no-overwrite", f"predict {{case}} --checkpoint {{ckpt}} --out {{o}}/prev {P}",
         "--overwrite", _marked("predict", "tumor_mask.nii.gz")),
    Case("predict-out-run-folder", f"predict {{case}} --checkpoint {{ckpt}} --out {{o}}/prev --overwrite {P}",
         "hepaseg train", _marked("train", "last.ckpt")),
    Case("predict-out-is-input-folder", f"predict {{lits}} --checkpoint {{ckpt}} --out {{lits}} --overwrite {P}",
         "--out is the input"),
    Case("predict-out-contains-input", f"predict {{case}} --checkpoint {{ckpt}} --out {{lits}} --overwrite {P}",
         "--out contains the input"),
    Case("predict-out-is-input-file", f"predict {{case}} --checkpoint {{ckpt}} --out {{case}} --overwrite {P}",
         "--out is the input"),
    Case("predict-out-inside-input-folder", f"predict {{lits}} --checkpoint {{ckpt}} --out {{lits}}/pred {P}",
         "--out is inside the input"),
    Case("predict-out-contains-checkpoint", f"predict {{case}} --checkpoint {{ckpt}} --out {{in}} --overwrite {P}",
         "--out contains the input"),
    Case("predict-out-under-file", f"predict {{case}} --checkpoint {{ckpt}} --out {{o}}/afile/pr {P}",
         "is a file, not a folder", _afile),
    # export (issues 6, 9)
    Case("export-checkpoint-missing", "export --checkpoint {in}/nope.ckpt --onnx {o}/m.onnx", "{in}/nope.ckpt"),
    Case("export-onnx-is-folder", "export --checkpoint {ckpt} --onnx {o}/folder", "--onnx is an existing folder",
         _folder),
    Case("export-onnx-foreign-file", "export --checkpoint {ckpt} --onnx {o}/model.onnx", "--onnx exists and is not",
         _foreign_onnx),
    Case("export-onnx-is-checkpoint", "export --checkpoint {ckpt} --onnx {ckpt}", "--onnx is the input"),
    Case("export-onnx-under-file", "export --checkpoint {ckpt} --onnx {o}/afile/m.onnx", "is a file, not a folder",
         _afile),
    # explain (issue 7)
    Case("explain-slice-out-of-range", "explain --checkpoint {ckpt} --input {case} --slice 99 --out {o}/f.png",
         "--slice"),
    Case("explain-query-unparsable", "explain --checkpoint {ckpt} --input {case} --slice 1 --out {o}/f.png "
         "--query 3;4", "--query"),
    Case("explain-query-outside", "explain --checkpoint {ckpt} --input {case} --slice 1 --out {o}/f.png "
         "--query 64,3", "--query"),
    Case("explain-out-not-png", "explain --checkpoint {ckpt} --input {case} --slice 1 --out {o}/f.jpg", "--out"),
    Case("explain-out-is-folder", "explain --checkpoint {ckpt} --input {case} --slice 1 --out {o}/f.png",
         "--out is an existing folder", _folder),
    Case("explain-out-inside-input", "explain --checkpoint {ckpt} --input {lits} --slice 1 --out {lits}/f.png",
         "--out is inside the input"),
    Case("explain-checkpoint-missing", "explain --checkpoint {in}/nope.ckpt --input {case} --slice 1 "
         "--out {o}/f.png", "{in}/nope.ckpt"),
    # benchmark (issues 6, 9)
    Case("benchmark-out-is-folder", "benchmark --models unet --quick --out {o}/folder", "--out is an existing folder",
         _folder),
    Case("benchmark-model-unknown", "benchmark --models nosuch --quick", "unknown model 'nosuch'"),
    Case("benchmark-width-zero", "benchmark --models unet --width 0 --quick", "--width"),
    # crossval (issue 8)
    Case("crossval-train-option-unparsable", "crossval {lits} --out {o}/cv --train-option lr", "--train-option"),
    Case("crossval-train-option-unknown", "crossval {lits} --out {o}/cv --train-option nonsense=1", "nonsense"),
    Case("crossval-prepare-option-own", "crossval {lits} --out {o}/cv --prepare-option split=[1,0,0]", "'split'"),
    Case("crossval-model-unknown", "crossval {lits} --out {o}/cv --models nonet", "unknown model 'nonet'"),
    Case("crossval-seeds-zero", "crossval {lits} --out {o}/cv --seeds 0", "--seeds"),
    Case("crossval-threshold-one", "crossval {lits} --out {o}/cv --threshold 1", "--threshold"),
    Case("crossval-val-fraction", "crossval {lits} --out {o}/cv --val-fraction 0.9", "--val-fraction"),
    Case("crossval-one-patient", "crossval {one} --out {o}/cv", "{one}: 1 patient found"),
    Case("crossval-source-missing", "crossval {in}/nope --out {o}/cv", "{in}/nope"),
    Case("crossval-out-foreign", "crossval {lits} --out {o}/mine", "{o}/mine", _mine),
    Case("crossval-out-contains-source", "crossval {lits} --out {in}", "--out contains the input"),
    # demo (issue 7)
    Case("demo-minutes-zero", "demo --out {o}/d --minutes 0 --sample-dir {empty}", "--minutes"),
    Case("demo-out-foreign", "demo --out {o}/mine --sample-dir {empty}", "{o}/mine", _mine),
    Case("demo-out-other-command", "demo --out {o}/prev --sample-dir {empty}", "hepaseg prepare",
         _marked("prepare", "manifest.json")),
    Case("demo-sample-dir-without-sample", "demo --out {o}/d --sample-dir {empty}", "img_117.mrc"),
    Case("demo-out-inside-sample-dir", "demo --out {empty}/d --sample-dir {empty}", "--out is inside the input"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones included): sha256 of files, "dir" for folders."""
    entries: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            entries[os.path.relpath(os.path.join(root, name), folder)] = "dir"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                entries[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return entries


def _params():
    for case in CASES:
        marks = []
        if case.setup is _readonly:
            marks.append(pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder "
                                            "(the check itself is tested in test_outputs.py with os.access patched)"))
        yield pytest.param(case, id=case.id, marks=marks)


def test_catalogue_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case: Case, world: dict[str, Path], tmp_path: Path) -> None:
    o = tmp_path / "o"
    o.mkdir()
    if case.setup is not None:
        case.setup(o)
    names = {key: str(value) for key, value in world.items()} | {"o": str(o)}
    args = [part.format(**names) for part in case.args.split()]
    expected = case.names.format(**names)
    inputs_before, outputs_before = _snapshot(world["in"]), _snapshot(o)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        if case.setup is _readonly:
            (o / "ro").chmod(0o755)
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0], errors[0]
    assert _snapshot(o) == outputs_before  # nothing half-written, no temporary left, nothing replaced
    assert _snapshot(world["in"]) == inputs_before  # every input byte-identical
