"""Lesion-wise detection metrics: hand-built volumes with known lesions, hits and false positives."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from hepaseg.evaluation import DIAMETER_BINS, fp_slice_rate, lesion_detection
from hepaseg.evaluation.detection import (
    axial_feret_diameter,
    diameter_bin,
    label_lesions,
    lesion_diameters,
    tumor_free_liver_slices,
)
from hepaseg.inference.lesions import lesion_table

SPACING = (2.0, 0.8, 0.8)  # (z, y, x) mm


def _square_diameter(n: int, s: float = 0.8) -> float:
    # The documented Feret diameter of an n x n pixel square (pixel-edge midpoints).
    return math.hypot(n, n - 1) * s


def _scene():
    """Three target lesions (big hit at IoU 27/33, small partly hit, medium missed) and one FP blob."""
    target = np.zeros((10, 80, 80), bool)
    pred = np.zeros_like(target)
    target[1:4, 5:35, 5:35] = True  # A: 30 x 30 px x 3 slices = 2700 voxels, 33.4 mm
    pred[1:4, 5:35, 8:38] = True  # A shifted by 3 px in x: IoU = 27 / 33
    target[6:8, 50:56, 50:56] = True  # B: 6 x 6 x 2 = 72 voxels, 6.2 mm
    pred[6, 52:54, 52:54] = True  # 4 voxels inside B: IoU 4 / 72
    target[6:8, 5:21, 50:66] = True  # C: 16 x 16 x 2 = 512 voxels, 17.5 mm, missed
    pred[0, 70:73, 70:73] = True  # FP blob, touching no target lesion
    return pred, target


def test_hand_built_scene_counts_recall_and_bins():
    pred, target = _scene()
    res = lesion_detection(pred, target, SPACING)
    assert (res["n_target"], res["n_pred"], res["fp_lesions"]) == (3, 3, 1)
    assert (res["found_iou"], res["found_any"]) == (1, 2)
    assert res["recall_iou"] == pytest.approx(1 / 3)
    assert res["recall_any"] == pytest.approx(2 / 3)

    a, c, b = res["lesions"]  # largest first
    assert [r["id"] for r in res["lesions"]] == [1, 2, 3]
    assert (a["voxels"], c["voxels"], b["voxels"]) == (2700, 512, 72)
    assert a["best_iou"] == pytest.approx(27 / 33)
    assert b["best_iou"] == pytest.approx(4 / 72)
    assert c["best_iou"] == 0.0
    assert (a["overlap_voxels"], b["overlap_voxels"], c["overlap_voxels"]) == (27 * 30 * 3, 4, 0)
    assert (a["found_iou"], a["found_any"]) == (True, True)
    assert (b["found_iou"], b["found_any"]) == (False, True)
    assert (c["found_iou"], c["found_any"]) == (False, False)
    assert a["diameter_mm"] == pytest.approx(_square_diameter(30))
    assert b["diameter_mm"] == pytest.approx(_square_diameter(6))
    assert c["diameter_mm"] == pytest.approx(_square_diameter(16))
    assert (a["bin"], b["bin"], c["bin"]) == (">20", "<10", "10-20")

    bins = res["bins"]
    assert list(bins) == [name for name, _, _ in DIAMETER_BINS]
    assert bins["<10"] == {"n": 1, "found_iou": 0, "found_any": 1, "recall_iou": 0.0, "recall_any": 1.0}
    assert bins["10-20"] == {"n": 1, "found_iou": 0, "found_any": 0, "recall_iou": 0.0, "recall_any": 0.0}
    assert bins[">20"] == {"n": 1, "found_iou": 1, "found_any": 1, "recall_iou": 1.0, "recall_any": 1.0}


def test_raising_the_iou_threshold_above_the_hit_loses_it():
    pred, target = _scene()
    res = lesion_detection(pred, target, SPACING, iou_threshold=0.85)  # 27/33 = 0.818
    assert (res["found_iou"], res["found_any"]) == (0, 2)


def test_iou_exactly_at_threshold_is_not_found():
    target = np.zeros((3, 10, 10), bool)
    target[1, 2:4, 2:4] = True  # 4 voxels
    pred = np.zeros_like(target)
    pred[1, 2:4, 2] = True  # 2 of them: IoU = 2 / 4
    res = lesion_detection(pred, target, (1, 1, 1))
    assert res["lesions"][0]["best_iou"] == 0.5
    assert (res["found_iou"], res["found_any"], res["fp_lesions"]) == (0, 1, 0)


def test_a_prediction_merging_two_lesions_is_a_miss_at_iou_but_a_hit_at_overlap():
    target = np.zeros((3, 20, 20), bool)
    target[1, 2:6, 2:6] = True
    target[1, 2:6, 8:12] = True
    pred = np.zeros_like(target)
    pred[1, 2:6, 2:12] = True  # one blob over both (and the gap): IoU 16 / 40 each
    res = lesion_detection(pred, target, (1, 1, 1))
    assert [r["best_iou"] for r in res["lesions"]] == pytest.approx([0.4, 0.4])
    assert (res["n_pred"], res["found_iou"], res["found_any"], res["fp_lesions"]) == (1, 0, 2, 0)


def test_empty_masks_give_nan_recall_and_no_false_positives():
    empty = np.zeros((4, 8, 8), bool)
    res = lesion_detection(empty, empty, (1, 1, 1))
    assert res["n_target"] == res["n_pred"] == res["fp_lesions"] == 0
    assert math.isnan(res["recall_iou"]) and math.isnan(res["recall_any"])
    assert all(math.isnan(b["recall_iou"]) and b["n"] == 0 for b in res["bins"].values())
    pred = empty.copy()
    pred[2, 3, 3] = True
    assert lesion_detection(pred, empty, (1, 1, 1))["fp_lesions"] == 1


def test_connectivity_diagonal_neighbours():
    target = np.zeros((4, 8, 8), bool)
    target[1, 2, 2] = target[2, 3, 3] = True  # corner-touching voxels
    assert lesion_detection(target, target, (1, 1, 1))["n_target"] == 1
    res6 = lesion_detection(target, target, (1, 1, 1), connectivity=1)
    assert (res6["n_target"], res6["found_iou"]) == (2, 2)


def test_matches_a_naive_pairwise_reference_on_random_blobs():
    rng = np.random.default_rng(1)
    for _ in range(4):
        target = ndimage.binary_opening(rng.random((6, 24, 24)) < 0.3)
        pred = ndimage.binary_opening(rng.random((6, 24, 24)) < 0.3) | (target & (rng.random(target.shape) < 0.8))
        res = lesion_detection(pred, target, (1.5, 0.7, 0.9))
        st = ndimage.generate_binary_structure(3, 3)
        t_lab, n_t = ndimage.label(target, st)
        p_lab, n_p = ndimage.label(pred, st)
        best, anyhit = [], []
        for i in range(1, n_t + 1):
            ti = t_lab == i
            ious = [(ti & (p_lab == j)).sum() / (ti | (p_lab == j)).sum() for j in range(1, n_p + 1)]
            best.append(max(ious, default=0.0))
            anyhit.append(bool((ti & pred).any()))
        fp = sum(not (target & (p_lab == j)).any() for j in range(1, n_p + 1))
        assert res["n_target"] == n_t and res["n_pred"] == n_p and res["fp_lesions"] == fp
        assert res["found_iou"] == sum(b > 0.5 for b in best)
        assert res["found_any"] == sum(anyhit)
        assert sorted(r["best_iou"] for r in res["lesions"]) == pytest.approx(sorted(best))


def test_diameters_agree_with_the_lesion_report_and_a_per_slice_reference():
    _, target = _scene()
    target[2, 40, 70:79] = True  # a thin line: 9 px long, at 0.8 mm
    labels, n = label_lesions(target)
    diam = lesion_diameters(labels, n, SPACING)
    # Independent per-slice maximum with the 2D function.
    ref = [max(axial_feret_diameter(labels[z] == i, SPACING[1:]) for z in range(labels.shape[0]))
           for i in range(1, n + 1)]
    assert diam == pytest.approx(ref)
    report = sorted(r["max_axial_diameter_mm"] for r in lesion_table(target, SPACING))
    assert sorted(r["diameter_mm"] for r in lesion_detection(target, target, SPACING)["lesions"]) == \
        pytest.approx(report)


@pytest.mark.parametrize(("d", "name"), [(0.0, "<10"), (9.99, "<10"), (10.0, "10-20"), (20.0, "10-20"),
                                         (20.01, ">20")])
def test_bin_edges(d, name):
    assert diameter_bin(d) == name


def test_fp_slice_rate_counts_only_tumour_free_liver_slices():
    label = np.zeros((8, 10, 10), np.uint8)
    label[0:6, 2:8, 2:8] = 1  # liver on slices 0-5
    label[2:4, 4:6, 4:6] = 2  # tumour on slices 2 and 3
    pred = np.zeros(label.shape, np.uint8)
    pred[0, 1, 1] = 1  # tumour-free liver slice, predicted outside the liver: counts
    pred[2, 4, 4] = 1  # tumour slice: not counted
    pred[7, 5, 5] = 1  # no liver: not counted
    assert tumor_free_liver_slices(label).tolist() == [0, 1, 4, 5]
    assert fp_slice_rate(pred, label) == 0.25
    assert fp_slice_rate(np.zeros_like(pred), label) == 0.0
    only_tumour = np.where(label > 0, 2, 0).astype(np.uint8)
    assert math.isnan(fp_slice_rate(pred, only_tumour))


def test_bad_input_is_refused_with_the_argument_named():
    a = np.zeros((3, 8, 8), bool)
    with pytest.raises(ValueError, match="differ in shape"):
        lesion_detection(a, np.zeros((3, 8, 9), bool), (1, 1, 1))
    with pytest.raises(ValueError, match="`pred` must be a 3D"):
        lesion_detection(a[0], a[0], (1, 1, 1))
    with pytest.raises(ValueError, match="iou_threshold"):
        lesion_detection(a, a, (1, 1, 1), iou_threshold=0.3)
    with pytest.raises(ValueError, match="spacing"):
        lesion_detection(a, a, (1, 1))
    with pytest.raises(ValueError, match="connectivity"):
        lesion_detection(a, a, (1, 1, 1), connectivity=4)
    with pytest.raises(ValueError, match="`label` differ|differ in shape"):
        fp_slice_rate(a, np.zeros((4, 8, 8), np.uint8))
