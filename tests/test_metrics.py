"""Slice and volume metrics, cross-checked against hand values, MONAI and medpy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from medpy.metric import binary as mb
from monai.metrics import (
    compute_average_surface_distance,
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    get_confusion_matrix,
)
from scipy import ndimage

from hepaseg.evaluation import (
    SLICE_METRICS,
    VOLUME_METRICS,
    global_dice,
    slice_metrics,
    surface_distances,
    volume_metrics,
)

SPACING = (2.5, 0.7, 0.7)  # typical abdominal CT, mm (z, y, x)


# ----------------------------------------------------------------------------- references
def _t(mask: np.ndarray) -> torch.Tensor:
    """(H, W[, D]) bool -> (1, 1, H, W[, D]) float tensor, MONAI's one-hot batch layout."""
    return torch.as_tensor(mask[None, None].astype(np.float32))


def monai_slice(pred: np.ndarray, target: np.ndarray, spacing=None) -> dict[str, float]:
    p, t = _t(pred), _t(target)
    cm = get_confusion_matrix(p, t, include_background=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks; we pass none here
        return {
            "dice": compute_dice(p, t, include_background=True).item(),
            "jaccard": compute_iou(p, t, include_background=True).item(),
            "precision": compute_confusion_matrix_metric("precision", cm).item(),
            "recall": compute_confusion_matrix_metric("recall", cm).item(),
            "specificity": compute_confusion_matrix_metric("specificity", cm).item(),
            "hausdorff": compute_hausdorff_distance(p, t, include_background=True, spacing=spacing).item(),
            "hd95": compute_hausdorff_distance(
                p, t, include_background=True, percentile=95, spacing=spacing
            ).item(),
        }


def medpy_slice(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    with np.errstate(invalid="ignore"):  # medpy leaves 0/0 as NaN (full-image target)
        specificity = mb.true_negative_rate(pred, target)
    return {
        "dice": mb.dc(pred, target),
        "jaccard": mb.jc(pred, target),
        "precision": mb.precision(pred, target),
        "recall": mb.recall(pred, target),
        "specificity": specificity,
        "hausdorff": mb.hd(pred, target),
    }


def assert_close(ours: dict, ref: dict, *, overlap_tol: float = 1e-6, dist_tol: float = 1e-4) -> None:
    for key, value in ref.items():
        tol = dist_tol if key in ("hausdorff", "hd95", "assd") else overlap_tol
        assert ours[key] == pytest.approx(value, abs=tol), f"{key}: ours {ours[key]}, reference {value}"


# ----------------------------------------------------------------------------- masks
def square(shape, y0, x0, size) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


def disk(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _hand_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    s = (16, 16)
    one_a, one_b = np.zeros(s, bool), np.zeros(s, bool)
    one_a[2, 3], one_b[5, 7] = True, True
    two_blobs = disk(s, 4, 4, 2.5) | disk(s, 11, 12, 2)
    edge = np.zeros(s, bool)
    edge[0:3, :] = True  # touches three image borders: border pixels are surface
    return {
        "offset_squares": (square(s, 0, 0, 4), square(s, 0, 2, 4)),
        "identical": (disk(s, 8, 8, 5), disk(s, 8, 8, 5)),
        "one_pixel_each": (one_a, one_b),
        "disjoint_blobs": (disk(s, 4, 4, 2.5), two_blobs),
        "nested": (square(s, 7, 7, 2), square(s, 5, 5, 6)),
        "touching_border": (edge, square(s, 0, 4, 5)),
        "full_target": (square(s, 0, 0, 16) & ~square(s, 0, 0, 3), np.ones(s, bool)),
    }


HAND = _hand_cases()


def random_pairs(n: int = 50, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded non-empty mask pairs, 32-64 px: noisy masks and smoothed blobs of mixed sizes."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        h, w = rng.integers(32, 65, size=2)
        masks = []
        for _ in range(2):
            m = rng.random((h, w)) < rng.uniform(0.02, 0.5)
            if i % 2:  # blob-like, as network outputs are
                m = ndimage.binary_opening(ndimage.gaussian_filter(m.astype(float), 2) > 0.3)
            m[rng.integers(h), rng.integers(w)] = True  # never empty
            masks.append(m)
        pairs.append((masks[0], masks[1]))
    return pairs


# ----------------------------------------------------------------------------- hand values
def test_offset_squares_hand_values():
    pred, target = HAND["offset_squares"]  # two 4x4 squares, x offset 2 px, 16x16 image
    m = slice_metrics(pred, target)
    assert set(m) == set(SLICE_METRICS)
    assert m["dice"] == 0.5
    assert m["jaccard"] == pytest.approx(1 / 3)
    assert m["precision"] == m["recall"] == 0.5
    assert m["specificity"] == pytest.approx((256 - 24) / (256 - 16))  # TN / (TN + FP)
    # Directed distances of the 12 ring pixels are four 0s, four 1s, four 2s both ways.
    assert m["hausdorff"] == 2.0
    assert m["hd95"] == 2.0


def test_one_pixel_masks_hand_values():
    m = slice_metrics(*HAND["one_pixel_each"])  # (2, 3) vs (5, 7): a 3-4-5 triangle
    assert m["dice"] == m["jaccard"] == m["precision"] == m["recall"] == 0.0
    assert m["hausdorff"] == m["hd95"] == 5.0


def test_identical_masks_are_perfect():
    m = slice_metrics(*HAND["identical"])
    assert m == {k: (0.0 if k in ("hausdorff", "hd95") else 1.0) for k in SLICE_METRICS}


def test_surface_distances_hand_values():
    d_pt, d_tp = surface_distances(*HAND["offset_squares"])
    assert sorted(d_pt) == sorted(d_tp) == [0.0] * 4 + [1.0] * 4 + [2.0] * 4


def test_accepts_bool_int_and_float_encodings():
    pred, target = HAND["disjoint_blobs"]
    ref = slice_metrics(pred, target)
    assert slice_metrics(pred.astype(np.uint8), target.astype(np.int64)) == ref
    assert slice_metrics(pred.astype(np.float32), target.astype(np.float64)) == ref


# ----------------------------------------------------------------------------- cross-checks
@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_cases_match_monai_and_medpy(name):
    pred, target = HAND[name]
    ours = slice_metrics(pred, target)
    ref_monai = monai_slice(pred, target)
    if name == "full_target":
        # No negatives in the target: MONAI gives NaN specificity (0/0); our policy says 1.
        assert math.isnan(ref_monai.pop("specificity")) and ours["specificity"] == 1.0
    assert_close(ours, ref_monai)
    ref_medpy = medpy_slice(pred, target)
    if name == "full_target":  # medpy's specificity is NaN for 0/0, ours 1 (documented)
        assert math.isnan(ref_medpy.pop("specificity"))
    assert_close(ours, ref_medpy)


def test_random_masks_match_monai_and_medpy():
    for pred, target in random_pairs():
        ours = slice_metrics(pred, target)
        assert_close(ours, monai_slice(pred, target))
        assert_close(ours, medpy_slice(pred, target))


def test_hd95_is_monai_definition_and_medpy_pools_both_directions():
    # medpy's hd95 is the 95th percentile of the pooled directed distances, ours/MONAI's the
    # larger of the two directed 95th percentiles: the surface distances themselves agree.
    n_differ = 0
    for pred, target in random_pairs(seed=1):
        d_pt, d_tp = surface_distances(pred, target)
        pooled = np.percentile(np.hstack([d_pt, d_tp]), 95)
        assert pooled == pytest.approx(mb.hd95(pred, target), abs=1e-9)
        assert sorted(d_pt) == pytest.approx(sorted(mb.__surface_distances(pred, target)))
        n_differ += abs(slice_metrics(pred, target)["hd95"] - pooled) > 1e-6
    assert n_differ > 0  # the two definitions are not interchangeable

    # A concrete case: prediction = target + a far 3x3 false-positive blob.
    target = square((40, 40), 2, 2, 10)
    pred = target | square((40, 40), 30, 30, 3)
    ours = slice_metrics(pred, target)["hd95"]
    assert ours == pytest.approx(monai_slice(pred, target)["hd95"], abs=1e-4)
    assert abs(ours - mb.hd95(pred, target)) > 1e-3


# ----------------------------------------------------------------------------- empty policy
def test_both_empty():
    z = np.zeros((6, 8), bool)
    m = slice_metrics(z, z)
    assert m == {
        "dice": 1.0,
        "jaccard": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "specificity": 1.0,
        "hausdorff": 0.0,
        "hd95": 0.0,
    }
    # MONAI's ignore_empty=False convention gives the same Dice/IoU.
    assert compute_dice(_t(z), _t(z), include_background=True, ignore_empty=False).item() == 1.0
    assert compute_iou(_t(z), _t(z), include_background=True, ignore_empty=False).item() == 1.0


def test_false_positive_slice():
    pred, target = square((6, 8), 1, 1, 2), np.zeros((6, 8), bool)
    m = slice_metrics(pred, target)
    assert m["dice"] == m["jaccard"] == m["precision"] == 0.0
    assert m["recall"] == 1.0  # nothing to find, nothing missed
    assert m["specificity"] == pytest.approx(44 / 48)
    assert m["hausdorff"] == m["hd95"] == 10.0  # diagonal of 6x8
    assert compute_dice(_t(pred), _t(target), include_background=True, ignore_empty=False).item() == 0.0


def test_missed_tumour_slice():
    pred, target = np.zeros((6, 8), bool), square((6, 8), 1, 1, 2)
    m = slice_metrics(pred, target)
    assert m["dice"] == m["jaccard"] == m["recall"] == 0.0
    assert m["precision"] == 0.0  # not the vacuous 1: a miss must not raise mean precision
    with np.errstate(invalid="ignore"):
        assert math.isnan(mb.precision(pred, target))  # medpy leaves 0/0 as NaN
    assert m["specificity"] == 1.0  # no false positives among 44 negatives
    assert m["hausdorff"] == m["hd95"] == 10.0


def test_no_negatives_specificity_is_one():
    full = np.ones((5, 5), bool)
    assert slice_metrics(full, full)["specificity"] == 1.0
    assert slice_metrics(np.zeros((5, 5), bool), full)["specificity"] == 1.0


def test_every_value_is_finite_on_random_slices_with_empties():
    rng = np.random.default_rng(3)
    for _ in range(30):
        pred = rng.random((20, 24)) < rng.choice([0.0, 0.1])
        target = rng.random((20, 24)) < rng.choice([0.0, 0.1])
        m = slice_metrics(pred, target)
        assert all(math.isfinite(v) for v in m.values())
        assert all(0.0 <= m[k] <= 1.0 for k in SLICE_METRICS[:5])
        assert 0.0 <= m["hd95"] <= m["hausdorff"] <= math.hypot(20, 24)


# ----------------------------------------------------------------------------- input checks
def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"pred \(4, 5\), target \(4, 6\)"):
        slice_metrics(np.zeros((4, 5)), np.zeros((4, 6)))


@pytest.mark.parametrize("shape", [(4,), (2, 4, 4)])
def test_slice_rejects_non_2d(shape):
    with pytest.raises(ValueError, match=r"`pred` has the wrong rank: expected a 2D mask"):
        slice_metrics(np.zeros(shape), np.zeros(shape))


@pytest.mark.parametrize("bad", [2, 0.5, -1, np.nan])
def test_rejects_non_binary_values(bad):
    target = np.zeros((4, 4))
    target[1, 1] = bad
    with pytest.raises(ValueError, match=r"`target` is not a binary mask: expected values in \{0, 1\}"):
        slice_metrics(np.zeros((4, 4)), target)


def test_surface_distances_rejects_empty():
    with pytest.raises(ValueError, match="must both contain foreground"):
        surface_distances(np.zeros((4, 4), bool), square((4, 4), 0, 0, 2))


# ----------------------------------------------------------------------------- volumes
def random_volume_pairs(n: int = 6, seed: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        shape = (int(rng.integers(8, 14)), int(rng.integers(24, 40)), int(rng.integers(24, 40)))
        zz, yy, xx = np.indices(shape)
        masks = []
        for _ in range(2):
            c = [rng.uniform(2, s - 2) for s in shape]
            r = rng.uniform(3, 9)  # mm
            # ellipsoid in physical space, plus some noise blobs for uneven surfaces
            m = ((zz - c[0]) * SPACING[0]) ** 2 + ((yy - c[1]) * SPACING[1]) ** 2 + (
                (xx - c[2]) * SPACING[2]
            ) ** 2 <= r * r
            m |= ndimage.binary_dilation(rng.random(shape) < 0.002)
            m[tuple(int(ci) for ci in c)] = True
            masks.append(m)
        pairs.append((masks[0], masks[1]))
    return pairs


def test_volume_matches_medpy_and_monai_with_anisotropic_spacing():
    for pred, target in random_volume_pairs():
        ours = volume_metrics(pred, target, SPACING)
        assert set(ours) == set(VOLUME_METRICS)
        assert_close(
            ours,
            {
                "dice": mb.dc(pred, target),
                "jaccard": mb.jc(pred, target),
                "rvd": mb.ravd(pred, target),  # medpy's ravd is signed the same way
                "assd": mb.assd(pred, target, voxelspacing=SPACING),
                "hausdorff": mb.hd(pred, target, voxelspacing=SPACING),
            },
        )
        ref = monai_slice(pred, target, spacing=list(SPACING))
        assert ours["hd95"] == pytest.approx(ref["hd95"], abs=1e-4)
        assert ours["hausdorff"] == pytest.approx(ref["hausdorff"], abs=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a MONAI-internal deprecation warning
            monai_assd = compute_average_surface_distance(
                _t(pred), _t(target), include_background=True, symmetric=True, spacing=list(SPACING)
            ).item()
        assert ours["assd"] == pytest.approx(monai_assd, abs=1e-4)
        d_pt, d_tp = surface_distances(pred, target, SPACING)
        assert np.percentile(np.hstack([d_pt, d_tp]), 95) == pytest.approx(
            mb.hd95(pred, target, voxelspacing=SPACING), abs=1e-4
        )
        assert ours["intersection"] == int((pred & target).sum())
        assert (ours["pred_voxels"], ours["target_voxels"]) == (int(pred.sum()), int(target.sum()))


def test_volume_hand_values():
    # Two 4-slice cubes (4x4 in-plane), pred shifted one slice up in z.
    target, pred = np.zeros((10, 8, 8), bool), np.zeros((10, 8, 8), bool)
    target[2:6, 2:6, 2:6] = True
    pred[3:7, 2:6, 2:6] = True
    m = volume_metrics(pred, target, SPACING)
    assert m["dice"] == 0.75 and m["jaccard"] == 0.6 and m["rvd"] == 0.0
    assert m["hausdorff"] == pytest.approx(2.5)  # pred's top face is one slice (2.5 mm) above
    assert (m["intersection"], m["pred_voxels"], m["target_voxels"]) == (48, 64, 64)

    grown = target.copy()
    grown[2:6, 2:6, 6] = True  # 80 voxels against 64: +25 %
    assert volume_metrics(grown, target, SPACING)["rvd"] == pytest.approx(0.25)
    assert volume_metrics(target, grown, SPACING)["rvd"] == pytest.approx(-0.2)


def test_volume_empty_policy():
    shape = (4, 10, 10)
    worst = math.sqrt((4 * 2.5) ** 2 + (10 * 0.7) ** 2 * 2)
    empty, blob = np.zeros(shape, bool), np.zeros(shape, bool)
    blob[1:3, 4:6, 4:6] = True
    both = volume_metrics(empty, empty, SPACING)
    assert (both["dice"], both["jaccard"], both["rvd"]) == (1.0, 1.0, 0.0)
    assert both["assd"] == both["hd95"] == both["hausdorff"] == 0.0
    fp = volume_metrics(blob, empty, SPACING)
    assert fp["dice"] == 0.0 and fp["rvd"] == math.inf
    assert fp["assd"] == fp["hd95"] == fp["hausdorff"] == pytest.approx(worst)
    miss = volume_metrics(empty, blob, SPACING)
    assert miss["dice"] == miss["jaccard"] == 0.0 and miss["rvd"] == -1.0
    assert miss["hausdorff"] == pytest.approx(worst)


def test_volume_input_checks():
    v = np.zeros((2, 3, 3))
    with pytest.raises(ValueError, match="expected a 3D mask"):
        volume_metrics(v[0], v[0], SPACING)
    with pytest.raises(ValueError, match=r"pred \(2, 3, 3\), target \(2, 3, 4\)"):
        volume_metrics(v, np.zeros((2, 3, 4)), SPACING)
    for bad in [(1.0, 1.0), (1.0, -0.7, 0.7), (1.0, math.nan, 1.0), 2.5]:
        with pytest.raises(ValueError, match="`spacing`"):
            volume_metrics(v, v, bad)


def test_global_dice_pools_counts():
    results = [
        {"intersection": 10, "pred_voxels": 20, "target_voxels": 20, "dice": 0.5},
        {"intersection": 0, "pred_voxels": 0, "target_voxels": 0, "dice": 1.0},
        {"intersection": 90, "pred_voxels": 100, "target_voxels": 100, "dice": 0.9},
    ]
    assert global_dice(results) == pytest.approx(2 * 100 / 240)
    pairs = random_volume_pairs(n=3, seed=9)
    per_case = [volume_metrics(p, t, SPACING) for p, t in pairs]
    stacked_p = np.concatenate([p.ravel() for p, _ in pairs])
    stacked_t = np.concatenate([t.ravel() for _, t in pairs])
    assert global_dice(per_case) == pytest.approx(mb.dc(stacked_p, stacked_t), abs=1e-12)
    assert global_dice([results[1]]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        global_dice([])
    with pytest.raises(ValueError, match=r"`per_case\[0\]` lacks 'pred_voxels'"):
        global_dice([{"intersection": 1, "target_voxels": 1}])


# ----------------------------------------------------------------------------- cropped transforms
def _naive_surface_distances(pred, target, spacing):
    """The implementation before the cropped transforms: scipy erosion and two whole-array EDTs."""
    cross = ndimage.generate_binary_structure(pred.ndim, 1)
    ps = pred ^ ndimage.binary_erosion(pred, structure=cross, border_value=0)
    ts = target ^ ndimage.binary_erosion(target, structure=cross, border_value=0)
    return (
        ndimage.distance_transform_edt(~ts, sampling=spacing)[ps],
        ndimage.distance_transform_edt(~ps, sampling=spacing)[ts],
    )


def _random_scene(rng, ndim):
    shape = tuple(int(rng.integers(3, 28)) for _ in range(ndim))

    def mask():
        m = np.zeros(shape, bool)
        for _ in range(int(rng.integers(1, 4))):  # a few boxes, some far apart
            c = [int(rng.integers(0, s)) for s in shape]
            r = [int(rng.integers(0, max(1, s // 4))) for s in shape]
            m[tuple(slice(max(0, ci - ri), ci + ri + 1) for ci, ri in zip(c, r))] = True
        if rng.random() < 0.3:
            m |= rng.random(shape) < 0.15  # speckle over the whole array
        return m

    return mask(), mask()


@pytest.mark.parametrize("ndim", [2, 3])
def test_cropped_surface_distances_equal_the_whole_array_transform(ndim):
    # Same distances, same order (C order of the surface pixels) as scipy over the whole array:
    # exact for unit spacing (integer squared distances), within 1e-6 relative with a spacing.
    rng = np.random.default_rng(11 + ndim)
    for _ in range(120):
        pred, target = _random_scene(rng, ndim)
        spacing = None if rng.random() < 0.4 else tuple(float(rng.uniform(0.3, 3.0)) for _ in range(ndim))
        ours = surface_distances(pred, target, spacing)
        ref = _naive_surface_distances(pred, target, spacing)
        for a, b in zip(ours, ref):
            assert a.dtype == np.float64 and a.shape == b.shape
            if spacing is None:
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


def test_cropped_transform_grows_its_box_until_no_outside_pixel_can_be_nearer():
    # The query's first box (grown by the 60 px gap between the boxes) holds only the far source
    # (0, 60) at 78 px, farther than the box's open face at 61 px; the nearer source (50, 70) at
    # 70 px lies outside it, so the box must grow once more.
    from hepaseg.evaluation.metrics import directed_distances

    query = np.zeros((100, 100), bool)
    query[50, 0] = True
    source = np.zeros_like(query)
    source[0, 60] = source[50, 70] = True
    assert directed_distances(query, source, (1.0, 1.0)).tolist() == [70.0]
    assert directed_distances(query, source, (3.0, 1.0)).tolist() == [70.0]  # rows cost 3 mm: (0, 60) is 161
    # The same with the near source removed: the far one is the answer.
    source[50, 70] = False
    assert directed_distances(query, source, (1.0, 1.0)).tolist() == [pytest.approx(math.hypot(50, 60))]


def test_speckled_volume_matches_the_whole_array_transform():
    # The write step's bad case in small: a speckled prediction against a compact reference.
    rng = np.random.default_rng(0)
    pred = rng.random((12, 64, 64)) < 0.25
    target = np.zeros_like(pred)
    target[4:9, 20:40, 25:45] = True
    ours = volume_metrics(pred, target, SPACING)
    d_pt, d_tp = _naive_surface_distances(pred, target, SPACING)
    assert ours["hausdorff"] == pytest.approx(max(d_pt.max(), d_tp.max()), rel=1e-6)
    assert ours["hd95"] == pytest.approx(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)), rel=1e-6)
    assert ours["assd"] == pytest.approx((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size), rel=1e-6)
