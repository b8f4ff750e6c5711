"""The liver-first cascade: ROI box arithmetic, prepare --target liver / --roi liver, predict_cascade,
predict_case / evaluate --volumes / CLI with a liver checkpoint, and refusal of bad cascades.

The geometry tests use a hand-built, noise-free scene whose structures differ in HU and
toy "networks" that threshold the windowed intensity, so the liver stage finds the liver
exactly and every expected mask can be written down by hand.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import hepaseg.training
from hepaseg.cli import app
from hepaseg.data.prepare import prepare
from hepaseg.data.roi import crop_slices, liver_crop_box, paste_slices
from hepaseg.errors import HepasegError
from hepaseg.inference import predict_case
from hepaseg.inference.cascade import (
    check_cascade,
    dilate_mm,
    largest_component,
    predict_cascade,
    require_liver_stage,
)
from hepaseg.inference.evaluate_volumes import evaluate_volumes
from hepaseg.io import Volume, write_image_nifti, write_label_nifti
from hepaseg.models import build_model
from hepaseg.training.config import TrainConfig
from hepaseg.training.datamodule import SliceDataModule
from hepaseg.training.train import resolve_config

WINDOW = (-200.0, 250.0)
SPACING = (2.0, 1.0, 1.0)  # z, y, x mm
SHAPE = (10, 64, 64)
# Hand-computed from the scene: liver y [20, 36), x [22, 38), + 10 px (10 mm) each side -> 36 x 36.
BOX = (10, 46, 12, 48)
LIVER_OPTS = {"window": list(WINDOW), "size": 64, "context_slices": 0, "slices": "all", "target": "liver"}
TUMOR_OPTS = {"window": list(WINDOW), "size": 36, "context_slices": 1, "slices": "tumor", "target": "tumor",
              "roi": "liver", "roi_margin_mm": 10.0}


def windowed(hu: float) -> float:
    return (min(max(hu, WINDOW[0]), WINDOW[1]) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


def make_scene() -> tuple[Volume, dict[str, np.ndarray]]:
    """A (10, 64, 64) CT: body 0 HU, liver 150 HU with a 100 HU tumour, and three decoys.

    Decoys (label 0): a 100 HU blob 2 mm below the liver (tumour-like, within 5 mm: kept),
    a 100 HU blob 8 mm away (dropped by the 5 mm rule) and a 150 HU blob (liver-like, a
    separate small component: dropped by the largest-component rule).
    """
    image = np.full(SHAPE, -1000.0, np.float32)
    label = np.zeros(SHAPE, np.uint8)
    image[:, 2:62, 2:62] = 0.0
    parts = {name: np.zeros(SHAPE, bool) for name in ("liver", "tumor", "near", "far", "fake_liver")}
    parts["liver"][2:8, 20:36, 22:38] = True
    parts["tumor"][4:6, 24:28, 26:30] = True
    parts["near"][4:6, 37:39, 30:33] = True  # y 37 is 2 mm from the liver's last row (35)
    parts["far"][4:6, 43:46, 24:27] = True  # 8 mm away, but inside BOX
    parts["fake_liver"][4:6, 42:45, 44:47] = True
    image[parts["liver"]] = 150.0
    label[parts["liver"]] = 1
    image[parts["tumor"]] = 100.0
    label[parts["tumor"]] = 2
    for name in ("near", "far"):
        image[parts[name]] = 100.0
    image[parts["fake_liver"]] = 150.0
    affine = np.diag([-SPACING[2], -SPACING[1], SPACING[0], 1.0])  # canonical LPS: read back unchanged
    volume = Volume(image=image, spacing=SPACING, affine=affine, label=label, case_id="scene", kind="lits")
    return volume, parts


class Above(nn.Module):
    """Liver toy: logit = 200 * (centre channel - t); liver where HU > 75 (liver and tumour)."""

    def __init__(self, hu: float = 75.0, k: int = 0) -> None:
        super().__init__()
        self.in_channels, self.k, self.t = 2 * k + 1, k, windowed(hu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 200.0 * (x[:, self.k : self.k + 1] - self.t)


class Band(nn.Module):
    """Tumour toy: logit = 200 * (0.05 - |centre - w(100 HU)|): tumour where HU is within ~22 HU of 100."""

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.in_channels, self.k, self.c = 2 * k + 1, k, windowed(100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 200.0 * (0.05 - (x[:, self.k : self.k + 1] - self.c).abs())


class Constant(nn.Module):
    """A constant logit everywhere; ``fail=True`` raises when called (a stage that must not run)."""

    def __init__(self, logit: float, k: int = 0, *, fail: bool = False) -> None:
        super().__init__()
        self.in_channels, self.logit, self.fail = 2 * k + 1, logit, fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise AssertionError("this stage must not run")
        return torch.full_like(x[:, :1], self.logit)


def write_checkpoint(path: Path, data_options: dict, *, model: str = "unet", head_bias: float = -10.0) -> Path:
    """A hepaseg checkpoint without training; the zeroed head gives the constant logit ``head_bias``."""
    torch.manual_seed(0)
    channels = 2 * int(data_options["context_slices"]) + 1
    net = build_model(model, in_channels=channels, num_classes=1, base_width=4)
    with torch.no_grad():
        for module in net.head.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
                module.bias.fill_(head_bias)
    torch.save({
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "hepaseg": {"version": "0.1.0", "model": model, "model_options": {}, "in_channels": channels,
                    "num_classes": 1, "base_width": 4, "data_options": data_options, "metrics": {}, "config": {}},
    }, path)
    return path


@pytest.fixture(scope="module")
def scene():
    return make_scene()


@pytest.fixture(scope="module")
def lits_dir(tmp_path_factory, scene) -> Path:
    """The scene three times in the LiTS layout (volume-i.nii.gz + segmentation-i.nii.gz)."""
    volume, _ = scene
    root = tmp_path_factory.mktemp("lits")
    for i in range(3):
        write_image_nifti(volume, root / f"volume-{i}.nii.gz")
        write_label_nifti(volume.label, volume, root / f"segmentation-{i}.nii.gz")
    return root


def _nifti_zyx(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


# --- the ROI box ----------------------------------------------------------------------------------


def test_box_is_the_grown_squared_liver_box_in_pixels():
    mask = np.zeros((3, 100, 100), bool)
    mask[1, 10:20, 30:50] = True  # rows 10..19, cols 30..49
    # margin 2 mm: 4 px along y (0.5 mm), 2 px along x (1 mm) -> y [6, 24) h 18, x [28, 52) w 24;
    # square 24: y grows by 6, 3 each side -> [3, 27).
    assert liver_crop_box(mask, (5.0, 0.5, 1.0), margin_mm=2.0) == (3, 27, 28, 52)
    # 10 mm at 0.8 mm is 12.5 px -> 13; at 0.5 mm exactly 20 (no spurious 21).
    # (y [-3, 33) h 36, x [17, 63) w 46 -> y [-8, 38) -> shifted into the image: [0, 46))
    assert liver_crop_box(mask, (1, 0.8, 0.8), margin_mm=10.0) == (0, 46, 17, 63)
    assert liver_crop_box(mask, (1, 0.5, 0.5), margin_mm=10.0) == (0, 60, 10, 70)
    # Odd growth: h 10, w 13 -> side 13, y grows 3: 1 before, 2 after.
    small = np.zeros((1, 40, 40), bool)
    small[0, 10:20, 10:23] = True
    assert liver_crop_box(small, (1, 1, 1), margin_mm=0) == (9, 22, 10, 23)
    assert liver_crop_box(np.zeros((2, 8, 8), bool), (1, 1, 1)) is None


def test_box_near_the_border_is_shifted_inside_and_a_box_larger_than_the_image_is_centred():
    mask = np.zeros((1, 50, 50), bool)
    mask[0, 0:4, 40:50] = True  # touches the top and the right edges
    y0, y1, x0, x1 = liver_crop_box(mask, (1, 1, 1), margin_mm=3)  # y [-3, 7) x [37, 53) -> side 16
    assert (y0, y1, x0, x1) == (0, 16, 34, 50)  # shifted, not shrunk
    wide = np.zeros((1, 20, 60), bool)
    wide[0, 5:15, 5:55] = True  # side 50 > 20 rows: centred on the image, padded 15 each side
    assert liver_crop_box(wide, (1, 1, 1), margin_mm=0) == (-15, 35, 5, 55)


def test_crop_and_paste_round_trip_with_and_without_padding():
    rng = np.random.default_rng(0)
    vol = rng.integers(1, 9, size=(4, 20, 60)).astype(np.int16)
    for box in ((2, 12, 30, 40), (-15, 35, 5, 55)):
        crops = crop_slices(vol, box, indices=[1, 3], fill=-7)
        y0, y1, x0, x1 = box
        assert crops.shape == (2, y1 - y0, x1 - x0)
        expected = np.full((2, y1 - y0, x1 - x0), -7, np.int16)  # naive reference, pixel by pixel
        for i, z in enumerate((1, 3)):
            for y in range(y0, y1):
                for x in range(x0, x1):
                    if 0 <= y < 20 and 0 <= x < 60:
                        expected[i, y - y0, x - x0] = vol[z, y, x]
        np.testing.assert_array_equal(crops, expected)
        back = paste_slices(crops, box, (20, 60))
        inside = np.zeros((20, 60), bool)
        inside[max(y0, 0) : y1, max(x0, 0) : x1] = True
        np.testing.assert_array_equal(back, np.where(inside, vol[[1, 3]], 0))
    with pytest.raises(ValueError, match="crops"):
        paste_slices(np.zeros((1, 5, 5)), (0, 6, 0, 6), (10, 10))


# --- prepare --target liver / --roi liver -----------------------------------------------------------


def test_prepare_target_liver_keeps_slices_with_and_without_liver_and_trains_label_above_zero(lits_dir, tmp_path):
    out = tmp_path / "liver"
    manifest = prepare(lits_dir, out, size=32, target="liver", split=(0.34, 0.33, 0.33), progress=False)
    assert manifest["options"]["target"] == "liver" and manifest["options"]["slices"] == "all"
    assert "roi" not in manifest["options"]
    volume, _ = make_scene()
    for case in manifest["cases"]:
        assert case["kept_slices"] == list(range(SHAPE[0])) and case["crop_box"] is None
    has_liver = (volume.label > 0).any(axis=(1, 2))
    assert has_liver.any() and not has_liver.all()  # both kinds of slices are kept
    dm = SliceDataModule(out, augment=False)  # no target given: the prepared one
    dm.setup()
    assert dm.target == "liver" and dm.data_options["target"] == "liver" and "roi" not in dm.data_options
    # `hepaseg train` leaves --target unset: the resolved config (config.json) says liver too,
    # and an explicit target still wins.
    assert resolve_config(TrainConfig(data=str(out), model="unet", out=str(tmp_path / "r"))).target == "liver"
    explicit = TrainConfig(data=str(out), model="unet", out=str(tmp_path / "r"), target="tumor")
    assert resolve_config(explicit).target == "tumor"
    assert SliceDataModule(out, augment=False, target="tumor").target == "tumor"
    with np.load(out / manifest["cases"][0]["shard"]) as npz:
        labels = npz["label"]
    for i, key in enumerate(dm.train_set.slice_keys):
        _, mask = dm.train_set[i]
        shard_row = labels[key[1]]
        np.testing.assert_array_equal(mask[0].numpy(), (shard_row > 0).astype(np.float32))


def test_prepare_roi_liver_crops_to_the_recorded_box_and_maps_back_exactly(lits_dir, tmp_path):
    out = tmp_path / "roi"
    manifest = prepare(lits_dir, out, size=36, roi="liver", split=(0.34, 0.33, 0.33), progress=False)
    assert manifest["options"]["roi"] == "liver" and manifest["options"]["roi_margin_mm"] == 10.0
    assert "target" not in manifest["options"]  # tumour, as before the cascade
    volume, _ = make_scene()
    keep = np.flatnonzero((volume.label == 2).any(axis=(1, 2)))  # tumour slices, the paper's protocol
    case = manifest["cases"][0]
    assert case["kept_slices"] == keep.tolist()
    assert tuple(case["crop_box"]) == BOX == liver_crop_box(volume.label > 0, SPACING, margin_mm=10.0)
    y0, y1, x0, x1 = case["crop_box"]
    with np.load(out / case["shard"]) as npz:
        image, label = npz["image"], npz["label"]
    # side 36 == size: no resize, so the shard is exactly the windowed crop
    np.testing.assert_array_equal(label, volume.label[keep, y0:y1, x0:x1])
    ref = (np.clip(volume.image[keep, y0:y1, x0:x1], *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    np.testing.assert_allclose(image[:, 0].astype(np.float32), ref, atol=1e-3)
    # ... and the box puts every label pixel back where it came from
    np.testing.assert_array_equal(paste_slices(label, case["crop_box"], SHAPE[1:]), volume.label[keep])
    dm = SliceDataModule(out, augment=False)
    assert dm.data_options["roi"] == "liver" and dm.data_options["roi_margin_mm"] == 10.0
    assert dm.data_options["target"] == "tumor"


def test_prepare_roi_resized_label_maps_back_to_the_box(lits_dir, tmp_path):
    manifest = prepare(lits_dir, tmp_path / "r", size=18, roi="liver", progress=False)  # 36 -> 18: exact 2x
    case = manifest["cases"][0]
    y0, y1, x0, x1 = case["crop_box"]
    volume, _ = make_scene()
    with np.load(tmp_path / "r" / case["shard"]) as npz:
        label = npz["label"]
    # nearest-exact 2x picks source pixel 2i + 1 of the crop
    np.testing.assert_array_equal(label, volume.label[case["kept_slices"], y0:y1, x0:x1][:, 1::2, 1::2])


def test_prepare_refuses_bad_roi_options(lits_dir, tmp_path):
    with pytest.raises(HepasegError, match="--roi liver with --target liver"):
        prepare(lits_dir, tmp_path / "a", target="liver", roi="liver", progress=False)
    with pytest.raises(HepasegError, match="--roi: expected one of liver"):
        prepare(lits_dir, tmp_path / "b", roi="tumor", progress=False)
    with pytest.raises(HepasegError, match="--roi-margin: expected a margin >= 0"):
        prepare(lits_dir, tmp_path / "c", roi="liver", roi_margin_mm=-1, progress=False)
    with pytest.raises(HepasegError, match="--target: expected one of tumor, liver"):
        prepare(lits_dir, tmp_path / "d", target="lung", progress=False)
    volume, _ = make_scene()
    write_image_nifti(volume, tmp_path / "plain.nii.gz")
    with pytest.raises(HepasegError, match="has no label map but --roi liver"):
        prepare(tmp_path / "plain.nii.gz", tmp_path / "e", roi="liver", slices="all", progress=False)
    assert not any((tmp_path / n).exists() for n in "abcde")


# --- predict_cascade ---------------------------------------------------------------------------------


def test_largest_component_and_dilation_match_naive_references():
    mask = np.zeros((5, 9, 9), bool)
    mask[0:3, 0:3, 0:3] = True  # 27 voxels
    mask[4, 8, 8] = True
    mask[3, 3, 3] = True  # touches the big block only diagonally: 26-connected to it
    got = largest_component(mask)
    expected = mask.copy()
    expected[4, 8, 8] = False
    np.testing.assert_array_equal(got, expected)
    assert not largest_component(np.zeros((2, 2, 2), bool)).any()

    seed = np.zeros((6, 12, 12), bool)
    seed[2, 5, 4] = seed[3, 6, 8] = True
    spacing = (2.0, 0.7, 1.1)
    zz, yy, xx = np.indices(seed.shape)
    dist = np.full(seed.shape, np.inf)
    for z, y, x in np.argwhere(seed):  # brute force: distance to the nearest seed voxel in mm
        d = np.sqrt(((zz - z) * spacing[0]) ** 2 + ((yy - y) * spacing[1]) ** 2 + ((xx - x) * spacing[2]) ** 2)
        dist = np.minimum(dist, d)
    for radius in (0.0, 2.0, 3.5):
        np.testing.assert_array_equal(dilate_mm(seed, spacing, radius), dist <= radius)


def _expected_tumor(parts) -> np.ndarray:
    return (parts["tumor"] | parts["near"]).astype(np.uint8)


def test_cascade_finds_liver_crops_pastes_back_and_drops_far_tumour(scene):
    volume, parts = scene
    result = predict_cascade(Above(), LIVER_OPTS, Band(k=1), TUMOR_OPTS, volume, batch=4, device="cpu",
                             precision="fp32", progress=False)
    np.testing.assert_array_equal(result.liver, volume.label > 0)  # the fake-liver blob is gone
    assert result.crop_box == BOX and result.warnings == []
    # tumour inside the liver and the blob 2 mm from it; the blob 8 mm away (inside the box) is dropped
    np.testing.assert_array_equal(result.tumor, _expected_tumor(parts))
    assert result.tumor.dtype == np.uint8 and result.liver.dtype == np.uint8
    assert result.tumor_slices == (0, 10)  # liver z 2..7 grown by 5 mm at 2 mm: 2 slices each side


def test_cascade_with_whole_slice_tumour_stage_and_resized_roi(scene):
    volume, parts = scene
    whole = {k: v for k, v in TUMOR_OPTS.items() if k not in ("roi", "roi_margin_mm")} | {"size": 64}
    result = predict_cascade(Above(), LIVER_OPTS, Band(), whole, volume, device="cpu", precision="fp32",
                             progress=False)
    assert result.crop_box == (0, 64, 0, 64)
    np.testing.assert_array_equal(result.tumor, _expected_tumor(parts))

    # A 36 px box at 24 px: the probabilities are resized back into the box, so the tumour lands in
    # the same place up to interpolation at its border.
    resized = predict_cascade(Above(), LIVER_OPTS, Band(), TUMOR_OPTS | {"size": 24}, volume, device="cpu",
                              precision="fp32", progress=False)
    truth = _expected_tumor(parts) > 0
    pred = resized.tumor > 0
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.6
    assert not pred[parts["far"]].any()
    assert not pred[~dilate_mm(volume.label > 0, SPACING, 5.0)].any()


class Recorder(Band):
    """The tumour toy, keeping every batch it is given."""

    def __init__(self) -> None:
        super().__init__(k=1)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return super().forward(x)


def test_tumour_stage_input_is_bit_for_bit_what_prepare_roi_stored(lits_dir, scene, tmp_path):
    """Same box, same crop, same window/resize/float16 rounding, and TRUE neighbours as context."""
    volume, _ = scene
    manifest = prepare(lits_dir / "volume-0.nii.gz", tmp_path / "p", size=36, roi="liver", slices="liver",
                       context_slices=1, progress=False)
    (case,) = manifest["cases"]
    with np.load(tmp_path / "p" / case["shard"]) as npz:
        stored = npz["image"].astype(np.float32)  # (n, 3, 36, 36)
    recorder = Recorder()
    # keep_margin_mm=0: the tumour stage runs on the liver slices 2..7 only, with slices 1 and 8 as context
    result = predict_cascade(Above(), LIVER_OPTS, recorder, TUMOR_OPTS, volume, keep_margin_mm=0.0, device="cpu",
                             precision="fp32", progress=False)
    assert result.tumor_slices == (2, 8) and case["kept_slices"] == list(range(2, 8))
    seen = torch.cat(recorder.seen).numpy()  # rows: slices 1..8
    assert seen.shape == (8, 3, 36, 36)
    np.testing.assert_array_equal(seen[1:7], stored)


def test_no_liver_gives_an_empty_tumour_and_a_warning_without_running_the_tumour_stage(scene):
    volume, _ = scene
    result = predict_cascade(Constant(-10.0), LIVER_OPTS, Constant(10.0, k=1, fail=True), TUMOR_OPTS, volume,
                             device="cpu", progress=False)
    assert not result.liver.any() and not result.tumor.any() and result.tumor.shape == SHAPE
    assert len(result.warnings) == 1 and "found no liver" in result.warnings[0]
    assert result.crop_box is None


@pytest.mark.parametrize(
    "liver, tumor, match",
    [
        (LIVER_OPTS | {"target": "tumor"}, TUMOR_OPTS, "liver-checkpoint: target 'tumor': expected a liver-stage"),
        ({k: v for k, v in LIVER_OPTS.items() if k != "target"}, TUMOR_OPTS, "expected a liver-stage"),
        (LIVER_OPTS | {"roi": "liver"}, TUMOR_OPTS, "expected a liver stage trained on whole slices"),
        (LIVER_OPTS, TUMOR_OPTS | {"target": "liver"}, "checkpoint: target 'liver': expected a tumour-stage"),
        (LIVER_OPTS, TUMOR_OPTS | {"roi": "box"}, "roi: expected one of liver"),
        (LIVER_OPTS, TUMOR_OPTS | {"roi_margin_mm": None}, "roi_margin_mm: expected a margin"),
        (LIVER_OPTS | {"window": [250, -200]}, TUMOR_OPTS, "window must be"),
        (LIVER_OPTS | {"window": [-100, 200]}, TUMOR_OPTS, r"window \[-100.0, 200.0\]: expected the tumour stage"),
    ],
)
def test_mismatched_cascades_are_refused(liver, tumor, match):
    with pytest.raises(HepasegError, match=match):
        check_cascade(liver, tumor)


def test_context_slices_that_do_not_fit_the_volume_are_refused_per_stage(scene):
    volume, _ = scene
    with pytest.raises(HepasegError, match=r"\(tumour stage\): has 10 axial slice.*context_slices=6"):
        predict_cascade(Above(), LIVER_OPTS, Band(k=6), TUMOR_OPTS | {"context_slices": 6}, volume, progress=False)
    with pytest.raises(HepasegError, match=r"\(liver stage\): has 10 axial slice"):
        predict_cascade(Above(k=5), LIVER_OPTS | {"context_slices": 5}, Band(), TUMOR_OPTS, volume, progress=False)


def test_roi_tumour_checkpoint_needs_a_liver_stage():
    require_liver_stage({"window": [0, 1], "size": 8, "context_slices": 0})  # whole slices: fine
    with pytest.raises(HepasegError, match="trained on liver-cropped slices.*Pass --liver-checkpoint"):
        require_liver_stage(TUMOR_OPTS)


# --- predict_case, evaluate --volumes, CLI -----------------------------------------------------------


@pytest.fixture()
def toy_checkpoints(tmp_path, monkeypatch):
    """Real checkpoint files whose networks load_checkpoint swaps for the exact toys above."""
    liver = write_checkpoint(tmp_path / "liver.ckpt", LIVER_OPTS | {"size": 32})
    tumor = write_checkpoint(tmp_path / "tumor.ckpt", TUMOR_OPTS | {"size": 32}, model="mfcnet")
    real = hepaseg.training.load_checkpoint
    toys = {liver: (Above(), LIVER_OPTS), tumor: (Band(), TUMOR_OPTS)}

    def load(path, map_location="cpu"):
        loaded = real(path, map_location)
        loaded.model, loaded.data_options = toys[Path(path)][0], dict(toys[Path(path)][1])
        return loaded

    monkeypatch.setattr(hepaseg.training, "load_checkpoint", load)
    return liver, tumor


def test_predict_case_cascade_writes_liver_mask_lits_labels_and_both_metrics(lits_dir, toy_checkpoints, tmp_path):
    liver_ckpt, tumor_ckpt = toy_checkpoints
    volume, parts = make_scene()
    out = tmp_path / "pred"
    result = predict_case(lits_dir / "volume-0.nii.gz", out, checkpoint=tumor_ckpt, liver_checkpoint=liver_ckpt,
                          labels="lits", device="cpu", progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".hepaseg-output.json", "tumor_mask.nii.gz", "liver_mask.nii.gz", "lesions.csv", "lesions.json",
         "overlay.png", "metrics.json"]
    )
    np.testing.assert_array_equal(_nifti_zyx(out / "liver_mask.nii.gz"), (volume.label > 0).astype(np.uint8))
    expected = np.where(_expected_tumor(parts) > 0, 2, np.where(volume.label > 0, 1, 0))
    np.testing.assert_array_equal(_nifti_zyx(out / "tumor_mask.nii.gz"), expected)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["liver"]["dice"] == 1.0 and metrics["liver"]["assd"] == 0.0
    t, near = int(parts["tumor"].sum()), int(parts["near"].sum())
    assert metrics["tumor"]["dice"] == pytest.approx(2 * t / (2 * t + near)) == metrics["dice"]
    report = json.loads((out / "lesions.json").read_text())
    assert report["warnings"] == [] and report["settings"]["cascade"]["crop_box"] == list(BOX)
    assert sorted(r["voxels"] for r in report["lesions"]) == sorted([t, near])
    assert result.warnings == [] and {"inference_liver", "inference_tumor"} <= set(result.timings)


def test_evaluate_volumes_scores_both_stages(lits_dir, toy_checkpoints, tmp_path):
    liver_ckpt, tumor_ckpt = toy_checkpoints
    _, parts = make_scene()
    res = evaluate_volumes(tumor_ckpt, [lits_dir / "volume-0.nii.gz"], liver_checkpoint=liver_ckpt,
                           out=tmp_path / "ev")
    (row,) = res.rows
    t, near = int(parts["tumor"].sum()), int(parts["near"].sum())
    assert row["liver_dice"] == 1.0 and row["dice"] == pytest.approx(2 * t / (2 * t + near))
    assert res.summary["liver"]["dice_per_case"] == 1.0 and res.summary["liver"]["dice_global"] == 1.0
    with open(res.paths["csv"]) as fh:
        (csv_row,) = list(csv.DictReader(fh))
    assert float(csv_row["liver_dice"]) == 1.0 and csv_row["warnings"] == ""
    assert json.loads(res.paths["json"].read_text())["liver_checkpoint"] == str(liver_ckpt)
    with pytest.raises(HepasegError, match="trained on liver-cropped slices"):
        evaluate_volumes(tumor_ckpt, [lits_dir / "volume-0.nii.gz"], out=tmp_path / "ev2")


def test_predict_case_refuses_roi_checkpoint_alone_and_swapped_checkpoints(lits_dir, tmp_path):
    liver = write_checkpoint(tmp_path / "liver.ckpt", LIVER_OPTS | {"size": 32})
    tumor = write_checkpoint(tmp_path / "tumor.ckpt", TUMOR_OPTS | {"size": 32})
    case = lits_dir / "volume-0.nii.gz"
    with pytest.raises(HepasegError, match=r"tumor.ckpt: this checkpoint was trained on liver-cropped slices"):
        predict_case(case, tmp_path / "a", checkpoint=tumor, progress=False)
    with pytest.raises(HepasegError, match="Did you swap --checkpoint and --liver-checkpoint"):
        predict_case(case, tmp_path / "b", checkpoint=liver, liver_checkpoint=tumor, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_predict_with_liver_checkpoint_prints_the_no_liver_warning(lits_dir, tmp_path):
    liver = write_checkpoint(tmp_path / "liver.ckpt", LIVER_OPTS | {"size": 32}, head_bias=-10.0)  # no liver
    tumor = write_checkpoint(tmp_path / "tumor.ckpt", TUMOR_OPTS | {"size": 32}, model="mfcnet", head_bias=10.0)
    out = tmp_path / "pred"
    res = CliRunner().invoke(app, ["predict", str(lits_dir / "volume-1.nii.gz"), "--out", str(out), "--checkpoint",
                                   str(tumor), "--liver-checkpoint", str(liver), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "warning" in res.output and "found no liver" in res.output
    assert not _nifti_zyx(out / "tumor_mask.nii.gz").any() and not _nifti_zyx(out / "liver_mask.nii.gz").any()
    assert "found no liver" in json.loads((out / "lesions.json").read_text())["warnings"][0]
    refused = CliRunner().invoke(app, ["predict", str(lits_dir / "volume-1.nii.gz"), "--out", str(tmp_path / "x"),
                                       "--checkpoint", str(tumor), "--no-progress"])
    assert refused.exit_code == 1 and "liver-cropped" in refused.output


def test_cli_prepare_roi_options(lits_dir, tmp_path):
    res = CliRunner().invoke(app, ["prepare", str(lits_dir), "--out", str(tmp_path / "p"), "--size", "16",
                                   "--roi", "liver", "--roi-margin", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["options"]["roi_margin_mm"] == 4.0
    # liver y [20, 36), x [22, 38) + 4 px: 24 x 24 already square
    assert manifest["cases"][0]["crop_box"] == [16, 40, 18, 42]
