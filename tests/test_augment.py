"""Augmentation presets and family switches, tumour-centred crops, synthetic tumours in the dataset,
the dice_topk loss, and a tiny training run wiring them together."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from _tiny_data import make_tiny_dataset
from hepaseg.cli import app
from hepaseg.data.augment import AUGMENT_FAMILIES, LIVER_ENHANCEMENT_HU, LiverEnhancement, ZScored, build_augmentation
from hepaseg.data.dataset import SliceDataset
from hepaseg.errors import HepasegError
from hepaseg.training import TrainConfig
from hepaseg.training.losses import DiceTopKLoss, build_loss, soft_dice_loss, topk_bce

INTENSITY_ONLY = ("noise", "blur", "intensity", "lowres", "gamma")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # 2 train cases x 6 slices of 32 x 32, 3 channels; every slice has liver, all but the first tumour.
    root = make_tiny_dataset(tmp_path_factory.mktemp("aug") / "data")
    with np.load(root / "cases" / "case00.npz") as npz:
        assert (npz["label"] == 1).any(axis=(1, 2)).all()
    return root


def _always(ds: SliceDataset) -> SliceDataset:
    """Force every random transform of the dataset's augmentation to fire (p = 1)."""
    for t in ds._augment.transforms:
        for inner in t.transforms if isinstance(t, ZScored) else [t]:
            inner.prob = 1.0
    return ds


def _raw(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of the train cases (case00, case01), in dataset order."""
    images, labels = [], []
    for case in ("case00", "case01"):
        with np.load(root / "cases" / f"{case}.npz") as npz:
            images.append(npz["image"].astype(np.float32))
            labels.append(npz["label"])
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("family", AUGMENT_FAMILIES)
def test_each_family_alone(tiny, family):
    ds = _always(SliceDataset(tiny, augment="nnunet", aug_off=[f for f in AUGMENT_FAMILIES if f != family], seed=1))
    plain = SliceDataset(tiny)
    image_changed = mask_changed = 0
    for i in range(1, 5):
        (x, m), (x0, m0) = ds[i], plain[i]
        assert x.shape == x0.shape and m.shape == m0.shape and x.dtype == torch.float32
        assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        image_changed += not torch.equal(x, x0)
        mask_changed += not torch.equal(m, m0)
    assert image_changed >= 3  # (a low-resolution zoom near 1 can leave a slice as it was)
    if family in INTENSITY_ONLY:
        assert mask_changed == 0  # intensity families never move the mask
    else:
        assert mask_changed >= 2  # spatial and mirror move image and mask together


def test_all_families_off_is_the_raw_shard(tiny):
    ds = SliceDataset(tiny, augment="nnunet", aug_off=AUGMENT_FAMILIES)
    images, labels = _raw(tiny)
    for i in range(len(images)):
        x, m = ds[i]
        np.testing.assert_array_equal(x.numpy(), images[i])
        np.testing.assert_array_equal(m[0].numpy(), (labels[i] == 2).astype(np.float32))
    assert build_augmentation("none") is None and build_augmentation("basic", off=["mirror", "spatial",
                                                                                   "intensity"]) is None


def test_presets_and_bool_compatibility(tiny):
    basic, true = SliceDataset(tiny, augment="basic", seed=3), SliceDataset(tiny, augment=True, seed=3)
    for i in range(len(basic)):
        torch.testing.assert_close(basic[i], true[i])
    assert SliceDataset(tiny, augment=False)._augment is None and SliceDataset(tiny, augment="none")._augment is None
    with pytest.raises(ValueError, match="augment"):
        SliceDataset(tiny, augment="heavy")
    with pytest.raises(ValueError, match="aug_off"):
        SliceDataset(tiny, augment="nnunet", aug_off=["colour"])


def test_nnunet_noise_is_scaled_to_hu_of_the_window(tiny):
    # nnU-Net's noise variance is in units of a ~40 HU foreground std: at most sqrt(0.1) * 40 HU here.
    ds = _always(SliceDataset(tiny, augment="nnunet", aug_off=[f for f in AUGMENT_FAMILIES if f != "noise"]))
    images, _ = _raw(tiny)
    width = 300.0  # tiny data window [-100, 200]
    for i in range(len(images)):
        inside = (images[i] > 0.05) & (images[i] < 0.95)  # away from the clip at 0 and 1
        diff = (ds[i][0].numpy() - images[i])[inside] * width
        assert diff.std() < 1.3 * math.sqrt(0.1) * 40.0


def test_tumor_centred_crops(tiny):
    crop = 16
    ds = SliceDataset(tiny, crop=crop, tumor_crop_fraction=1.0, seed=0)
    images, labels = _raw(tiny)
    for i in range(len(ds)):
        x, m = ds[i]
        assert x.shape == (3, crop, crop) and m.shape == (1, crop, crop)
        if (labels[i] == 2).any():
            assert m[0, crop // 2, crop // 2] == 1  # a tumour pixel exactly at the centre
    # fraction 0: uniform crops, each an exact window of the raw slice
    uniform = SliceDataset(tiny, crop=crop, tumor_crop_fraction=0.0, seed=0)
    offsets = set()
    for i in range(len(uniform)):
        x = uniform[i][0].numpy()
        hits = [(t, s) for t in range(32 - crop + 1) for s in range(32 - crop + 1)
                if np.array_equal(images[i][:, t : t + crop, s : s + crop], x)]
        assert hits
        offsets.add(hits[0])
    assert len(offsets) > 1
    with pytest.raises(ValueError, match="crop"):
        SliceDataset(tiny, crop=64)
    with pytest.raises(ValueError, match="tumor_crop_fraction"):
        SliceDataset(tiny, tumor_crop_fraction=0.5)


def test_crop_near_the_border_is_zero_padded(tiny):
    # a 31 px crop of a 32 px slice centred on a tumour pixel usually reaches over the border
    ds = SliceDataset(tiny, crop=31, tumor_crop_fraction=1.0, seed=0)
    _, labels = _raw(tiny)
    padded = 0
    for i in range(len(ds)):
        x, m = ds[i]
        assert x.shape == (3, 31, 31)
        if (labels[i] == 2).any():
            assert m[0, 15, 15] == 1
            padded += bool((x == 0).all(dim=0).any())  # zero rows/columns of padding
    assert padded >= 5


def test_synthetic_tumours_in_the_dataset(tiny):
    ds = SliceDataset(tiny, synthetic_tumors=1.0, synthetic_contrast_hu=(60, 60), seed=0)
    plain = SliceDataset(tiny)
    _, labels = _raw(tiny)
    grew = 0
    for i in range(len(ds)):
        (x, m), (x0, m0) = ds[i], plain[i]
        new = (m > 0) & (m0 == 0)
        assert torch.equal(m0 * m, m0)  # real tumour kept
        assert (x <= x0 + 1e-7).all()  # only darker
        assert np.all(labels[i][new[0].numpy()] == 1)  # painted inside the liver only
        grew += bool(new.any())
    assert grew >= 3  # 11 mm livers around big real tumours: often no room (the medium/large classes)
    # per-case pixel size from the manifest: spacing 1 mm x 32 px / 32 px, slices 2 mm apart
    assert ds._geometry["case00"] == ((1.0, 1.0), 2.0)


def _liver_slice(size: int = 96):
    """Liver disc (label 1, 115 HU) with a tumour (label 2, 75 HU) in fat (-100 HU); window -200..250."""
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((size, size), np.uint8)
    label[(yy - 48) ** 2 + (xx - 48) ** 2 < 36**2] = 1
    label[(yy - 48) ** 2 + (xx - 58) ** 2 < 10**2] = 2
    hu = np.choose(label, [-100.0, 115.0, 75.0])
    image = ((hu + 200.0) / 450.0).astype(np.float32)[None].repeat(3, 0)
    return image, label


def test_liver_enhancement_shifts_parenchyma_and_part_of_the_lesion():
    image, label = _liver_slice()
    enh = LiverEnhancement(1.0, window=(-200.0, 250.0), pixel_mm=1.0)
    # away from the blurred edges (1 mm sigma, truncated at 3 sigma): pure parenchyma, lesion, background
    liver, lesion, rest = (ndimage_erosion(label == v, 4) for v in (1, 2, 0))
    signs = set()
    for seed in range(30):
        out, info = enh(image, label, np.random.default_rng(seed))
        delta, share = info["shift_hu"], info["lesion_share"]
        assert LIVER_ENHANCEMENT_HU[0] <= delta <= LIVER_ENHANCEMENT_HU[1] and 0.0 <= share <= 1.0
        change = (out - image) * 450.0
        np.testing.assert_allclose(change[:, liver], delta, atol=0.01)
        np.testing.assert_allclose(change[:, lesion], share * delta, atol=0.01)
        assert np.abs(change[:, rest]).max() < 1e-3  # the rest of the slice is untouched
        # the lesion-to-liver contrast (75 - 115 = -40 HU) moves by (share - 1) * delta
        contrast = np.median((out[1] * 450 - 200)[label == 2]) - np.median((out[1] * 450 - 200)[label == 1])
        assert contrast == pytest.approx(-40.0 + (share - 1.0) * delta, abs=0.5)
        signs.add(np.sign(round(contrast)))
    assert signs >= {-1.0, 1.0}  # "darker than the liver" is no longer always true
    fixed = LiverEnhancement(1.0, window=(-200.0, 250.0), shift_hu=(-50.0, -50.0), lesion_share=(0.0, 0.0))
    out, _ = fixed(image, label, np.random.default_rng(0))
    assert np.median((out[1] - image[1])[label == 1]) * 450 == pytest.approx(-50.0, abs=0.01)


def ndimage_erosion(mask: np.ndarray, r: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=r)  # Chebyshev distance > r


def test_liver_enhancement_off_no_liver_and_bad_arguments():
    image, label = _liver_slice()
    copy = image.copy()
    off = LiverEnhancement(0.0, window=(-200.0, 250.0))
    out, info = off(image, label, np.random.default_rng(0))
    assert info is None and np.array_equal(out, image)
    out, info = LiverEnhancement(1.0, window=(-200.0, 250.0))(image, np.zeros_like(label), np.random.default_rng(0))
    assert info is None and np.array_equal(out, image)  # no liver in the slice: nothing to shift
    half = LiverEnhancement(0.5, window=(-200.0, 250.0))
    drawn = sum(half(image, label, np.random.default_rng(s))[1] is not None for s in range(40))
    assert 10 <= drawn <= 30
    np.testing.assert_array_equal(image, copy)  # input never modified
    for kwargs, name in (({"prob": 2.0}, "prob"), ({"prob": 1.0, "shift_hu": (10, -10)}, "shift_hu"),
                         ({"prob": 1.0, "lesion_share": (0.5, 2.0)}, "lesion_share")):
        with pytest.raises(ValueError, match=name):
            LiverEnhancement(window=(-200.0, 250.0), **kwargs)


def test_families_and_liver_enhancement_in_the_dataset(tiny):
    plain = SliceDataset(tiny)
    bright = SliceDataset(tiny, synthetic_tumors=1.0, synthetic_families=("hyper",), seed=0)
    grew = 0
    for i in range(len(bright)):
        (x, m), (x0, m0) = bright[i], plain[i]
        new = ((m > 0) & (m0 == 0))[0].numpy()
        if new.any():
            grew += 1
            assert float(np.median((x - x0)[1].numpy()[new])) > 0  # painted lesions are brighter
    assert grew >= 3
    enh = SliceDataset(tiny, liver_enhancement=1.0, liver_enhancement_hu=(-40.0, -40.0), seed=0)
    _, labels = _raw(tiny)
    for i in range(len(enh)):
        (x, m), (x0, m0) = enh[i], plain[i]
        assert torch.equal(m, m0)  # labels unchanged
        liver = ndimage_erosion(labels[i] == 1, 4)
        if liver.any():
            # the tiny data's window is 400 HU wide or less: -40 HU is at least 0.1 in window units
            assert float((x - x0)[1].numpy()[liver].max()) < -0.05


def test_determinism_given_seed_and_epoch(tiny):
    options = {"augment": "nnunet", "synthetic_tumors": 0.5, "crop": 24, "tumor_crop_fraction": 0.5}
    a, b = SliceDataset(tiny, seed=5, **options), SliceDataset(tiny, seed=5, **options)
    order = [3, 0, 7, 3]
    first = [a[i] for i in order]
    second = [b[i] for i in reversed(order)][::-1]  # other access order, same items
    for xa, xb in zip(first, second):
        torch.testing.assert_close(xa, xb)
    a.set_epoch(1)
    assert any(not torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    b.set_epoch(1)
    for i in range(len(a)):
        torch.testing.assert_close(a[i], b[i])
    other = SliceDataset(tiny, seed=6, **options)
    assert any(not torch.equal(other[i][0], b[i][0]) for i in range(len(b)))


# --- loss ----------------------------------------------------------------------------------------


def test_topk_bce_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.0, 3.0, -2.0, 1.0, 0.5, -0.5, 4.0, -3.0]).view(1, 1, 2, 5)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 5)
    per_pixel = [math.log1p(math.exp(-z)) if t else math.log1p(math.exp(z))
                 for z, t in zip(logits.flatten().tolist(), target.flatten().tolist())]
    hardest = sorted(per_pixel, reverse=True)
    assert float(topk_bce(logits, target, k=20)) == pytest.approx(sum(hardest[:2]) / 2, rel=1e-6)  # 3.0 and -1.0
    assert float(topk_bce(logits, target, k=100)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, target)), rel=1e-6)
    assert float(topk_bce(logits, target, k=1)) == pytest.approx(hardest[0], rel=1e-6)  # ceil keeps one pixel
    loss = DiceTopKLoss(k=20)
    expected = float(soft_dice_loss(logits, target)) + sum(hardest[:2]) / 2
    assert float(loss(logits, target)) == pytest.approx(expected, rel=1e-6)
    assert isinstance(build_loss("dice_topk"), DiceTopKLoss) and build_loss("dice_topk").k == 10
    with pytest.raises(ValueError, match="k"):
        DiceTopKLoss(k=0)


# --- config and training -------------------------------------------------------------------------


def test_config_checks_new_options(tmp_path):
    base = {"data": "d", "model": "unet", "out": str(tmp_path)}
    assert TrainConfig(**base, augment="basic").augment is True
    assert TrainConfig(**base, augment="none").augment is False
    assert TrainConfig(**base, augment="nnunet").augment == "nnunet"
    with pytest.raises(HepasegError, match="--augment"):
        TrainConfig(**base, augment="heavy")
    with pytest.raises(HepasegError, match="--no-aug.*'colour'"):
        TrainConfig(**base, aug_off=["colour"])
    with pytest.raises(HepasegError, match="--tumor-crop-fraction.*--crop"):
        TrainConfig(**base, tumor_crop_fraction=0.5)
    with pytest.raises(HepasegError, match="--synthetic-tumors"):
        TrainConfig(**base, synthetic_tumors=2.0)
    with pytest.raises(HepasegError, match="--crop"):
        TrainConfig(**base, crop=0)
    assert TrainConfig(**base).synthetic_families == ["hypo"]  # Hu et al.; configs written before it
    assert TrainConfig.from_dict({**base}).liver_enhancement == 0.0
    with pytest.raises(HepasegError, match="--synthetic-family.*'bright'"):
        TrainConfig(**base, synthetic_families=["hypo", "bright"])
    with pytest.raises(HepasegError, match="--synthetic-family"):
        TrainConfig(**base, synthetic_families=[])
    with pytest.raises(HepasegError, match="--liver-enhancement"):
        TrainConfig(**base, liver_enhancement=1.5)
    from hepaseg.cli import _families

    assert _families(None) == ["hypo"] and _families(["hyper, iso", "rim"]) == ["hyper", "iso", "rim"]
    assert _families(["all"]) == ["hypo", "iso", "hyper", "rim", "deposit"]


def test_tiny_training_run_records_calibration(tiny, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny), "--model", "unet", "--width", "4", "--out", str(run),
            "--max-epochs", "2", "--batch-size", "4", "--precision", "32", "--no-progress",
            "--synthetic-tumors", "0.5", "--augment", "nnunet", "--no-aug", "noise", "--loss", "dice_topk",
            "--crop", "24", "--tumor-crop-fraction", "0.5",
            "--synthetic-family", "hypo,hyper", "--synthetic-family", "rim", "--liver-enhancement", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    config = saved["config"]
    assert (config["augment"], config["aug_off"], config["loss"]) == ("nnunet", ["noise"], "dice_topk")
    assert (config["synthetic_tumors"], config["crop"], config["tumor_crop_fraction"]) == (0.5, 24, 0.5)
    # The tiny data's tumours are BRIGHTER than liver (not hypodense): the paper's range is used.
    assert config["synthetic_contrast_hu"] == [65.0, 145.0]
    calibration = saved["synthetic_calibration"]
    assert calibration["contrast_hu"] < 0 and not calibration["calibrated"]
    assert calibration["source"].startswith("paper")
    assert (config["synthetic_families"], config["liver_enhancement"]) == (["hypo", "hyper", "rim"], 0.5)
    assert config["liver_enhancement_hu"] == [-60.0, 20.0]
    from hepaseg.training import read_checkpoint

    recorded = read_checkpoint(run / "last.ckpt")["hepaseg"]["config"]
    assert recorded["synthetic_families"] == ["hypo", "hyper", "rim"] and recorded["liver_enhancement"] == 0.5
    assert (run / "last.ckpt").is_file()
    too_big = CliRunner().invoke(app, args[:-10] + ["--crop", "64", "--overwrite"])
    assert too_big.exit_code == 1 and "--crop" in too_big.output
