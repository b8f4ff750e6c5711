"""Synthetic tumours (Hu et al., CVPR 2023): placement, size in mm, painted pixels, darkening, calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from hepaseg.data.synthetic import (
    DEPOSIT_CONTRAST_HU,
    FAMILIES,
    FAMILY_CONTRAST_HU,
    PAPER_DARKENING_HU,
    RIM_CONTRAST_HU,
    TEXTURE_GAIN,
    SyntheticTumors,
    calibrated_darkening,
    measure_tumor_contrast,
    synthetic_calibration,
)
from hepaseg.io.volume import Volume

WINDOW = (-200.0, 250.0)  # 450 HU wide


def _phantom(size: int = 128, *, liver_radius: float = 0.45, tumor: bool = True, channels: int = 3):
    """A liver ellipse (label 1, value 0.7) with an optional real tumour disc (label 2, 0.55)."""
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    label = np.zeros((size, size), np.uint8)
    label[((yy - c) / (liver_radius * size)) ** 2 + ((xx - c) / (liver_radius * size)) ** 2 < 1] = 1
    if tumor:
        label[(yy - c) ** 2 + (xx - c - 0.2 * size) ** 2 < (0.06 * size) ** 2] = 2
    image = np.choose(label, [0.1, 0.7, 0.55]).astype(np.float32)[None].repeat(channels, 0)
    return image, label


def _painted(label_in: np.ndarray, label_out: np.ndarray) -> np.ndarray:
    return (label_out == 2) & (label_in != 2)


def _disc(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= r**2


def test_lesions_inside_liver_away_from_real_tumours_and_label_marks_painted_pixels():
    image, label = _phantom()
    pixel_mm = 1.0
    st = SyntheticTumors(1.0, window=WINDOW, pixel_mm=pixel_mm, slice_mm=2.0, margin_mm=5.0)
    real = label == 2
    near_real = ndimage.binary_dilation(real, _disc(5))  # 5 mm margin at 1 mm pixels
    # blurred edge: sigma <= 2 mm, separable Gaussian truncated at 3 sigma -> a square ring of <= 6 px
    ring = np.ones((2 * 6 + 1, 2 * 6 + 1), bool)
    painted_any = 0
    for seed in range(12):
        out_image, out_label = st(image, label, np.random.default_rng(seed))
        new = _painted(label, out_label)
        painted_any += bool(new.any())
        assert set(np.unique(out_label)) <= {0, 1, 2}
        assert np.array_equal(out_label[~new], label[~new])  # only label 2 is added
        assert not (new & (label != 1)).any()  # inside the liver (never on real tumour)
        assert not (new & near_real).any()  # never within the margin of a real tumour
        changed = (out_image != image).any(axis=0)
        assert not (changed & (label != 1)).any() and not (changed & near_real).any()
        # the image changes only on the painted pixels and their blurred edge ...
        assert not (changed & ~ndimage.binary_dilation(new, ring)).any()
        # ... and only darker; nearly every painted pixel is darkened in the centre channel
        assert (out_image <= image + 1e-7).all()
        if new.any():
            assert (out_image[1][new] < image[1][new]).mean() > 0.95
    assert painted_any >= 10


def test_size_class_gives_requested_diameter_in_mm():
    # Anisotropic pixels: 0.8 mm along y, 1.25 mm along x; 'small' = semi-axes in [6, 10] mm.
    py, px = 0.8, 1.25
    image, label = _phantom(200, liver_radius=0.48, tumor=False, channels=1)
    st = SyntheticTumors(1.0, window=WINDOW, pixel_mm=(py, px), sizes=("small",), count=(1, 1))
    interior = ndimage.binary_erosion(label == 1, _disc(1))
    diameters, extent_y, extent_x = [], [], []
    for seed in range(40):
        _, out = st(image, label, np.random.default_rng(seed))
        new = out == 2
        if not new.any() or (new & ~interior).any():
            continue  # clipped by the liver boundary: not the lesion's own size
        diameters.append(2 * math.sqrt(new.sum() * py * px / math.pi))
        ys, xs = np.nonzero(new)
        extent_y.append((np.ptp(ys) + 1) * py)
        extent_x.append((np.ptp(xs) + 1) * px)
    assert len(diameters) >= 20
    # 2 * sqrt(a * b) with a, b ~ U(6, 10) mm: mean ~ 15.9 mm, range 12-20 mm (+ elastic wobble)
    assert 14.0 < np.mean(diameters) < 18.0, np.mean(diameters)
    assert 10.0 < min(diameters) and max(diameters) < 23.0
    assert abs(np.mean(extent_y) - np.mean(extent_x)) < 2.5  # round in mm although pixels are not square
    tiny = SyntheticTumors(1.0, window=WINDOW, pixel_mm=(py, px), sizes=("tiny",), count=(1, 1))
    medium = SyntheticTumors(1.0, window=WINDOW, pixel_mm=(py, px), sizes=("medium",), count=(1, 1))
    tiny_area = np.mean([(tiny(image, label, np.random.default_rng(s))[1] == 2).sum() for s in range(10)])
    medium_area = np.mean([(medium(image, label, np.random.default_rng(s))[1] == 2).sum() for s in range(10)])
    assert tiny_area * 8 < medium_area  # 4 mm vs 16 mm radius: about 16 x the area


def test_darkening_is_in_requested_hu_range_converted_to_window_units():
    image, label = _phantom(tumor=False)
    a = SyntheticTumors(1.0, window=WINDOW, pixel_mm=1.0, contrast_hu=(20, 20))
    b = SyntheticTumors(1.0, window=WINDOW, pixel_mm=1.0, contrast_hu=(140, 140))
    wide = SyntheticTumors(1.0, window=(-400.0, 500.0), pixel_mm=1.0, contrast_hu=(140, 140))
    for seed in range(5):
        out_a, lab_a = a(image, label, np.random.default_rng(seed))
        out_b, lab_b = b(image, label, np.random.default_rng(seed))
        out_w, lab_w = wide(image, label, np.random.default_rng(seed))
        assert np.array_equal(lab_a, lab_b) and np.array_equal(lab_a, lab_w)  # same draw, other depth
        da, db, dw = image - out_a, image - out_b, image - out_w
        # darkening = D * texture * edge with texture, edge in [0, 1]: at most D (in window units) ...
        assert db.max() <= 140 / 450 + 1e-6 and da.max() <= 20 / 450 + 1e-6
        # ... and linear in D (HU) and in 1 / window width
        np.testing.assert_allclose(db, da * 7, atol=1e-5)
        np.testing.assert_allclose(dw, db * 450 / 900, atol=1e-5)
        new = lab_b == 2
        median_hu = np.median(db[1][new]) * 450
        assert 0.2 * 140 < median_hu < 0.7 * 140  # ~ TEXTURE_GAIN * D
    paper = SyntheticTumors(1.0, window=WINDOW, pixel_mm=1.0)
    maxima = [(image - paper(image, label, np.random.default_rng(s))[0]).max() * 450 for s in range(20)]
    assert max(maxima) <= 145 + 1e-3 and min(maxima) > 0.3 * 65


def test_context_channels_get_the_ellipsoid_cross_section():
    image, label = _phantom(tumor=False)
    near = SyntheticTumors(1.0, window=WINDOW, pixel_mm=1.0, slice_mm=3.0, sizes=("medium",), count=(1, 1))
    far = SyntheticTumors(1.0, window=WINDOW, pixel_mm=1.0, slice_mm=60.0, sizes=("medium",), count=(1, 1))
    for seed in range(3):
        out, lab = near(image, label, np.random.default_rng(seed))
        changed = (out != image).sum(axis=(1, 2))
        assert 0 < changed[0] < changed[1] and 0 < changed[2] < changed[1]  # smaller 3 mm away
        out_far, lab_far = far(image, label, np.random.default_rng(seed))
        assert np.array_equal(lab_far, lab)
        assert np.array_equal(out_far[0], image[0]) and np.array_equal(out_far[2], image[2])  # beyond rz <= 20 mm
        np.testing.assert_array_equal(out_far[1], out[1])


def test_deterministic_no_op_and_too_small_liver():
    image, label = _phantom()
    st = SyntheticTumors(0.5, window=WINDOW, pixel_mm=1.0)
    outs = [st(image, label, np.random.default_rng(3)) for _ in range(2)]
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    results = [st(image, label, np.random.default_rng(s))[1] for s in range(20)]
    n_painted = sum((r == 2).sum() > (label == 2).sum() for r in results)
    assert 4 <= n_painted <= 16  # prob 0.5
    image_copy, label_copy = image.copy(), label.copy()
    zero = SyntheticTumors(0.0, window=WINDOW, pixel_mm=1.0)
    for s in range(5):
        out_image, out_label = zero(image, label, np.random.default_rng(s))
        np.testing.assert_array_equal(out_image, image)
        np.testing.assert_array_equal(out_label, label)
    np.testing.assert_array_equal(image, image_copy)  # inputs never modified
    np.testing.assert_array_equal(label, label_copy)
    # a liver of 6 px radius at 1 mm: no room for a large (>= 24 mm radius) lesion
    small_image, small_label = _phantom(64, liver_radius=0.1, tumor=False)
    large = SyntheticTumors(1.0, window=WINDOW, pixel_mm=1.0, sizes=("large",))
    for s in range(3):
        out_image, out_label = large(small_image, small_label, np.random.default_rng(s))
        np.testing.assert_array_equal(out_image, small_image)
        np.testing.assert_array_equal(out_label, small_label)


def test_bad_arguments():
    with pytest.raises(ValueError, match="prob"):
        SyntheticTumors(1.5, window=WINDOW)
    with pytest.raises(ValueError, match="window"):
        SyntheticTumors(0.5, window=(100, -100))
    with pytest.raises(ValueError, match="sizes"):
        SyntheticTumors(0.5, window=WINDOW, sizes=("huge",))
    with pytest.raises(ValueError, match="pixel_mm"):
        SyntheticTumors(0.5, window=WINDOW, pixel_mm=0)
    with pytest.raises(ValueError, match="contrast_hu"):
        SyntheticTumors(0.5, window=WINDOW, contrast_hu=(100, 50))


# --- lesion families ------------------------------------------------------------------------------


def _one_lesion(family: str, seed: int, size: str = "medium"):
    """Paint one lesion of ``family`` into a uniform 115 HU liver (0.7 in the window) at 1 mm pixels."""
    image, label = _phantom(200, liver_radius=0.48, tumor=False, channels=1)
    st = SyntheticTumors(1.0, window=WINDOW, pixel_mm=1.0, sizes=(size,), count=(1, 1), families=(family,))
    out, lab, info = st.paint(image, label, np.random.default_rng(seed))
    interior = ndimage.binary_erosion(label == 1, _disc(2))
    new = lab == 2
    clipped = bool((new & ~interior).any())  # cut by the liver's border: not the lesion's own size
    return (out[0] - image[0]) * 450.0, new, info, clipped  # change in HU, painted pixels


@pytest.mark.parametrize("family", FAMILIES)
def test_family_paints_requested_sign_and_size(family):
    sizes_ok = 0
    for seed in range(8):
        change, new, info, clipped = _one_lesion(family, seed)
        assert info is not None and info["family"] == family and info["size"] == "medium"
        assert new.sum() > 0
        c = info["contrast_hu"]
        median = float(np.median(change[new]))
        if family == "hypo":
            assert -145.0 <= c <= -65.0 and median < -10.0  # the paper's darkening, ~0.4 D
        elif family in ("iso", "hyper"):
            lo, hi = FAMILY_CONTRAST_HU[family]
            assert lo <= c <= hi
            assert median == pytest.approx(c, abs=0.05)  # the requested median contrast, exactly
            if family == "hyper":
                assert median >= 15.0 and (change[new] > 0).mean() > 0.9  # brighter than the liver
            else:
                assert abs(median) <= 10.05
        elif family == "rim":
            width = info["rim_width_mm"]
            ring = new & ~ndimage.binary_erosion(new, _disc(max(1, int(width))))
            core = ndimage.binary_erosion(new, _disc(int(math.ceil(width)) + 2))
            assert RIM_CONTRAST_HU[0] <= abs(info["rim_hu"]) <= RIM_CONTRAST_HU[1]
            assert np.sign(info["rim_hu"]) == -np.sign(c) and 5.0 <= abs(c) <= 30.0  # opposite signs
            assert np.sign(np.median(change[ring])) == np.sign(info["rim_hu"])
            assert abs(np.median(change[ring])) > 0.5 * abs(info["rim_hu"])
            assert np.sign(np.median(change[core])) == np.sign(c)
        elif family == "deposit":
            assert DEPOSIT_CONTRAST_HU[0] <= info["deposit_hu"] <= DEPOSIT_CONTRAST_HU[1]
            dense = change[new] > 100.0  # deposits are >= 130 HU above the liver (or at the window's top)
            assert abs(dense.mean() - info["deposit_fraction"]) < 0.15
            if dense.mean() < 0.8:
                assert np.median(change[new][~dense]) < 0  # the rest is the necrotic, darker core
        # size: the painted area matches the drawn semi-axes (the elastic warp moves it a little)
        ry, rx, _ = info["lesions"][0]["semi_axes_mm"]
        assert 12.0 <= ry <= 20.0 and 12.0 <= rx <= 20.0  # medium: 0.75-1.25 x 16 mm
        if not clipped:
            sizes_ok += 1
            assert 0.7 < new.sum() / (math.pi * ry * rx) < 1.4, (new.sum(), ry, rx)
    assert sizes_ok >= 4


def test_families_are_drawn_per_sample_and_hypo_alone_is_the_old_stream():
    image, label = _phantom(tumor=False)
    mixed = SyntheticTumors(1.0, window=WINDOW, pixel_mm=1.0, families=FAMILIES)
    seen = {mixed.paint(image, label, np.random.default_rng(s))[2]["family"] for s in range(40)}
    assert seen == set(FAMILIES)
    default = SyntheticTumors(1.0, window=WINDOW, pixel_mm=1.0)
    hypo = SyntheticTumors(1.0, window=WINDOW, pixel_mm=1.0, families=("hypo",))
    for s in range(3):
        a, b = default(image, label, np.random.default_rng(s)), hypo(image, label, np.random.default_rng(s))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    bright = SyntheticTumors(1.0, window=WINDOW, pixel_mm=1.0, families=("hyper",), sizes=("small",))
    out, lab, info = bright.paint(image, label, np.random.default_rng(0))
    changed = (out != image).any(axis=0)
    assert not (changed & (label != 1)).any()  # still painted inside the liver only
    with pytest.raises(ValueError, match="families"):
        SyntheticTumors(1.0, window=WINDOW, families=("bright",))
    with pytest.raises(ValueError, match="families"):
        SyntheticTumors(1.0, window=WINDOW, families=())


# --- calibration ---------------------------------------------------------------------------------


def _volume(case_id: str, liver_hu: float, tumor_hu: float | None) -> Volume:
    label = np.zeros((2, 8, 8), np.uint8)
    label[:, 1:7, 1:7] = 1
    if tumor_hu is not None:
        label[:, 3:5, 3:5] = 2
    image = np.choose(label, [-500.0, liver_hu, tumor_hu or 0.0]).astype(np.float32)
    image[0, 1, 1] += 30  # one outlier: medians ignore it
    return Volume(image=image, spacing=(1.0, 1.0, 1.0), affine=np.eye(4), label=label, case_id=case_id)


def test_measure_contrast_on_volumes_by_hand():
    result = measure_tumor_contrast([_volume("a", 120.0, 70.0), _volume("b", 100.0, 60.0), _volume("c", 90.0, None)])
    assert result["cases"]["a"]["contrast_hu"] == pytest.approx(50.0)
    assert result["cases"]["b"]["contrast_hu"] == pytest.approx(40.0)
    assert result["cases"]["c"]["contrast_hu"] is None and result["cases"]["c"]["tumor_pixels"] == 0
    assert result["cases"]["a"]["tumor_pixels"] == 8 and result["cases"]["a"]["liver_pixels"] == 64
    assert result["contrast_hu"] == pytest.approx(45.0)  # median over cases with tumour
    # pooled: liver pixels 64 x 120, 64 x 100, 64 x 90 -> median 100; tumour 8 x 70, 8 x 60 -> 65 (0.1 HU bins)
    assert result["pooled"]["liver_hu"] == pytest.approx(100.0, abs=0.1)
    assert result["pooled"]["tumor_hu"] == pytest.approx(65.0, abs=5.1)
    assert result["calibrated"] and result["darkening_hu"] == pytest.approx(list(calibrated_darkening(45.0)))


def test_calibrated_darkening_rule():
    assert calibrated_darkening(None) == PAPER_DARKENING_HU
    assert calibrated_darkening(2.0) == PAPER_DARKENING_HU  # not hypodense: paper's range
    assert calibrated_darkening(-30.0) == PAPER_DARKENING_HU
    lo, hi = calibrated_darkening(TEXTURE_GAIN * 105)
    assert (lo, hi) == pytest.approx(PAPER_DARKENING_HU)
    lo, hi = calibrated_darkening(TEXTURE_GAIN * 210)
    assert (lo, hi) == pytest.approx((130.0, 290.0))  # same relative spread, twice the centre


def _write_prepared(root: Path, cases: list[tuple[str, str, float, float | None]], window=(-100.0, 200.0)) -> Path:
    """A minimal hepaseg-slices/1 directory: (id, split, liver HU, tumour HU or None) per case, K = 0."""
    (root / "cases").mkdir(parents=True)
    entries = []
    lo, hi = window
    for case_id, split, liver_hu, tumor_hu in cases:
        label = np.zeros((2, 16, 16), np.uint8)
        label[:, 2:14, 2:14] = 1
        if tumor_hu is not None:
            label[:, 6:9, 6:9] = 2
        hu = np.choose(label, [-1000.0, liver_hu, tumor_hu if tumor_hu is not None else 0.0])
        image = ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float16)[:, None]
        np.savez_compressed(root / "cases" / f"{case_id}.npz", image=image, label=label,
                            slice_index=np.arange(2, dtype=np.int32))
        entries.append({"id": case_id, "split": split, "shard": f"cases/{case_id}.npz", "n_slices": 2,
                        "kept_slices": [0, 1], "shape": [2, 32, 32], "spacing": [2.5, 0.8, 0.8],
                        "tumor_pixels": int((label == 2).sum()), "liver_pixels": int((label > 0).sum()),
                        "has_label": True, "source": "test", "kind": "test"})
    manifest = {"format": "hepaseg-slices/1", "n_slices": 2 * len(cases), "hepaseg_version": "0.1.0",
                "options": {"window": list(window), "size": 16, "slices": "liver", "context_slices": 0,
                            "split": None, "split_file": None, "seed": 0, "z_split": None},
                "demo_z_split": False, "cases": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_measure_contrast_on_prepared_train_split(tmp_path):
    root = _write_prepared(tmp_path / "p", [("a", "train", 110.0, 60.0), ("b", "train", 100.0, 70.0),
                                            ("c", "val", 100.0, -50.0)])
    result = measure_tumor_contrast(root)
    assert set(result["cases"]) == {"a", "b"}  # train only
    # float16 window units: within 0.2 HU of the HU written
    assert result["cases"]["a"]["contrast_hu"] == pytest.approx(50.0, abs=0.3)
    assert result["contrast_hu"] == pytest.approx(40.0, abs=0.3)
    assert set(measure_tumor_contrast(root, split=None)["cases"]) == {"a", "b", "c"}
    record = synthetic_calibration(root)
    assert record["calibrated"] and record["source"] == "measured on train" and record["cases_measured"] == 2
    assert record["darkening_hu"] == pytest.approx(list(calibrated_darkening(record["contrast_hu"])))
    # label-free: no tumour labels in train -> the paper's range
    free = _write_prepared(tmp_path / "f", [("a", "train", 110.0, None), ("b", "val", 100.0, 60.0)])
    record = synthetic_calibration(free)
    assert not record["calibrated"] and record["darkening_hu"] == list(PAPER_DARKENING_HU)
    assert record["contrast_hu"] is None and record["source"].startswith("paper")


@pytest.mark.realdata
def test_contrast_of_real_ct(ircadb_dir, lits117_dir):
    from hepaseg.io import find_cases, read_volume

    volumes = [read_volume(p) for d in (ircadb_dir, lits117_dir) for p in find_cases([d])]
    result = measure_tumor_contrast(volumes)
    # Portal-venous CT: hypodense tumours, median liver 113 / 119 HU, tumour 76 / 69 HU.
    assert result["cases"]["ircadb-1.1"]["contrast_hu"] == pytest.approx(37.0, abs=0.5)
    assert result["cases"]["lits-117"]["contrast_hu"] == pytest.approx(49.5, abs=0.5)
    assert result["calibrated"] and result["contrast_hu"] == pytest.approx(43.25, abs=0.5)
