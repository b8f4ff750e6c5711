"""Post-processing (holes, small lesions, lesions outside the liver), the per-lesion confidence columns,
liver volume and tumour burden after a cascade, and a cascade whose liver stage is an ensemble."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from hepaseg.cli import app
from hepaseg.errors import HepasegError
from hepaseg.inference import lesion_table, lesions_to_csv, predict_case
from hepaseg.inference.cascade import predict_cascade
from hepaseg.inference.evaluate_volumes import evaluate_volumes
from hepaseg.inference.lesion_stats import LESION_CONFIDENCE_COLUMNS, lesion_confidence
from hepaseg.inference.postprocess import PostProcess, postprocess_mask
from test_cascade import (  # noqa: F401  (fixtures: scene, lits_dir, toy_checkpoints)
    LIVER_OPTS,
    SPACING,
    TUMOR_OPTS,
    Above,
    Band,
    Constant,
    _nifti_zyx,
    lits_dir,
    make_scene,
    scene,
    toy_checkpoints,
)

# --- post-processing ------------------------------------------------------------------------------------


def test_fill_holes_fills_in_plane_holes_only():
    mask = np.zeros((3, 9, 9), np.uint8)
    mask[1, 2:7, 2:7] = 1
    mask[1, 4, 4] = 0  # a hole in slice 1
    mask[2, 2:7, 2:7] = 1
    mask[2, 4, 2:7] = 0  # a slit open to the ring's outside: not a hole
    out, info = postprocess_mask(mask, (2.0, 1.0, 1.0), PostProcess(fill_holes=True))
    assert out[1, 4, 4] == 1 and info["filled_voxels"] == 1
    np.testing.assert_array_equal(out[2], mask[2])
    np.testing.assert_array_equal(postprocess_mask(mask, (1, 1, 1), PostProcess())[0], mask)  # default: no change


def test_small_lesions_and_lesions_outside_the_liver_are_dropped_by_hand():
    spacing = (2.0, 1.0, 0.5)  # 1 mm^3 voxels
    mask = np.zeros((4, 12, 12), np.uint8)
    mask[0:2, 0:3, 0:3] = 1  # A: 18 voxels = 18 mm^3, in the liver
    mask[3, 10, 10] = 1  # B: 1 voxel = 1 mm^3, in the liver
    mask[0:2, 6:9, 6:8] = 1  # C: 12 voxels, 4 of them in the liver (1/3)
    liver = np.zeros_like(mask)
    liver[:, 0:5, 0:5] = 1
    liver[3, 10, 10] = 1
    liver[0:2, 6:8, 6:7] = 1  # 4 voxels of C
    out, info = postprocess_mask(mask, spacing, PostProcess(min_lesion_mm3=2.0), liver=liver)
    assert info["removed_small"] == 1 and out.sum() == 30 and out[3, 10, 10] == 0
    out, info = postprocess_mask(mask, spacing, PostProcess(min_liver_fraction=0.5), liver=liver)
    assert info["removed_outside_liver"] == 1 and out.sum() == 19 and not out[0:2, 6:9, 6:8].any()
    out, _ = postprocess_mask(mask, spacing, PostProcess(min_liver_fraction=0.3), liver=liver)  # 1/3 >= 0.3: kept
    assert out.sum() == 31
    out, info = postprocess_mask(mask, spacing, PostProcess(min_lesion_mm3=2, min_liver_fraction=0.5), liver=liver)
    assert (info["lesions_before"], info["removed_small"], info["removed_outside_liver"], info["lesions_after"]) == (
        3, 1, 1, 1)
    with pytest.raises(HepasegError, match="--min-liver-fraction: needs a predicted liver"):
        postprocess_mask(mask, spacing, PostProcess(min_liver_fraction=0.5))


def test_settings_parse_describe_and_refuse_bad_values():
    setting = PostProcess.parse("fill-holes, min_lesion_mm3=50,min-liver-fraction=0.5")
    assert setting == PostProcess(min_lesion_mm3=50, fill_holes=True, min_liver_fraction=0.5)
    assert setting.describe() == "fill holes, >= 50 mm3, >= 50 % in liver"
    assert PostProcess.parse("none").is_off and PostProcess().describe() == "none"
    with pytest.raises(HepasegError, match="cannot parse 'holes'"):
        PostProcess.parse("holes")
    with pytest.raises(HepasegError, match="--min-liver-fraction: expected a fraction in \\[0, 1\\], got 2"):
        PostProcess(min_liver_fraction=2)
    with pytest.raises(HepasegError, match="--min-lesion-mm3: expected a volume >= 0"):
        PostProcess(min_lesion_mm3=-1)


# --- the lesion columns ----------------------------------------------------------------------------------


def _hand_scene():
    """A liver box with three lesions: inside (3 mm deep), across the surface, outside (2 mm away)."""
    shape, spacing = (10, 20, 20), (2.0, 1.0, 1.0)
    liver = np.zeros(shape, bool)
    liver[1:9, 2:18, 2:18] = True
    mask = np.zeros(shape, np.uint8)
    prob = np.zeros(shape, np.float32)
    spread = np.zeros(shape, np.float32)
    votes = np.zeros(shape, np.uint8)
    mask[4:6, 5:9, 8:12] = 1  # A: 32 voxels; nearest surface: row y = 2, 3 rows (3 mm) from y = 5
    prob[4:6, 5:9, 8:12], spread[4:6, 5:9, 8:12], votes[4:6, 5:9, 8:12] = 0.9, 0.1, 0b111
    prob[5, 8, 11] = 0.99
    mask[4, 10:12, 15:20] = 1  # B: 10 voxels, x 15..17 in the liver (x = 17 is its surface), 18..19 outside
    prob[4, 10:12, 15:20], spread[4, 10:12, 15:20], votes[4, 10:12, 15:20] = 0.6, 0.2, 0b001
    votes[4, 11, 19] = 0b010
    mask[6, 19, 5:8] = 1  # C: 3 voxels in row y = 19, 2 mm from the liver's last row (17)
    prob[6, 19, 5:8] = [0.55, 0.65, 0.75]
    spread[6, 19, 5:8], votes[6, 19, 5:8] = 0.3, 0b100
    return mask, spacing, liver, prob, spread, votes


def _brute_force_distance(mask_lesion: np.ndarray, liver: np.ndarray, spacing) -> float:
    """min over lesion voxels of the distance (mm) to any liver voxel with a 6-neighbour outside the liver."""
    padded = np.pad(liver, 1)
    inner = np.ones_like(liver)
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    surface = np.argwhere(liver & ~inner) * np.asarray(spacing)
    points = np.argwhere(mask_lesion) * np.asarray(spacing)
    return float(np.sqrt(((points[:, None] - surface[None]) ** 2).sum(-1)).min())


def test_lesion_columns_by_hand():
    mask, spacing, liver, prob, spread, votes = _hand_scene()
    rows = lesion_confidence(mask, spacing, probability=prob, uncertainty=spread, votes=votes, n_members=3,
                             liver=liver)
    table = lesion_table(mask, spacing)
    assert [r["voxels"] for r in rows] == [r["voxels"] for r in table] == [32, 10, 3]
    a, b, c = rows
    assert a["mean_probability"] == pytest.approx((31 * 0.9 + 0.99) / 32) and a["max_probability"] == pytest.approx(
        0.99)
    assert b["mean_probability"] == pytest.approx(0.6) and c["mean_probability"] == pytest.approx(0.65)
    assert c["max_probability"] == pytest.approx(0.75)
    assert [r["mean_uncertainty"] for r in rows] == pytest.approx([0.1, 0.2, 0.3])
    assert [r["member_agreement"] for r in rows] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert [r["liver_fraction"] for r in rows] == pytest.approx([1.0, 0.6, 0.0])
    assert [r["liver_surface_distance_mm"] for r in rows] == pytest.approx([3.0, 0.0, 2.0])
    # The same against a brute-force distance to the surface voxels.
    boxes = [(slice(4, 6), slice(5, 9), slice(8, 12)), (slice(4, 5), slice(10, 12), slice(15, 20)),
             (slice(6, 7), slice(19, 20), slice(5, 8))]
    for row, box in zip(rows, boxes):
        lesion = np.zeros_like(liver)
        lesion[box] = True
        assert row["liver_surface_distance_mm"] == pytest.approx(_brute_force_distance(lesion, liver, spacing))
    # A liver stage that left lesion A out (a cavity) keeps A's depth: the cavity is filled first.
    holed = liver.copy()
    holed[mask.astype(bool) & liver] = False
    deep = lesion_confidence(mask, spacing, liver=holed)[0]
    assert deep["liver_surface_distance_mm"] == pytest.approx(3.0) and deep["liver_fraction"] == 0.0
    # Nothing given: NaN columns (one member: agreement 1); CSV blank for NaN.
    bare = lesion_confidence(mask, spacing)
    assert math.isnan(bare[0]["mean_probability"]) and bare[0]["member_agreement"] == 1.0
    csv_rows = list(csv.DictReader(io.StringIO(lesions_to_csv([{**t, **r} for t, r in zip(table, rows)]))))
    assert list(csv_rows[0])[-len(LESION_CONFIDENCE_COLUMNS):] == LESION_CONFIDENCE_COLUMNS
    assert csv_rows[1]["member_agreement"] == "0.6667" and csv_rows[2]["liver_surface_distance_mm"] == "2.0000"
    assert lesion_confidence(np.zeros((2, 3, 3)), spacing) == []


def _whole_volume_confidence(mask, spacing, probability, uncertainty, votes, n_members, liver):
    """The columns as the first implementation computed them: scipy over the whole volume, no cropping."""
    from scipy import ndimage

    labels, n = ndimage.label(mask != 0, structure=np.ones((3, 3, 3)))
    index = np.arange(1, n + 1)
    filled = ndimage.binary_fill_holes(liver)
    surface = filled & ~ndimage.binary_erosion(filled, structure=ndimage.generate_binary_structure(3, 1),
                                               border_value=0)
    depth = ndimage.distance_transform_edt(~surface, sampling=spacing)
    found = sum((np.asarray(ndimage.maximum((votes >> m) & 1, labels, index)) > 0).astype(float)
                for m in range(n_members))
    columns = {
        "voxels": np.asarray(ndimage.sum(np.ones_like(labels), labels, index)),
        "mean_probability": np.asarray(ndimage.mean(probability, labels, index)),
        "max_probability": np.asarray(ndimage.maximum(probability, labels, index)),
        "mean_uncertainty": np.asarray(ndimage.mean(uncertainty, labels, index)),
        "member_agreement": found / n_members,
        "liver_fraction": np.asarray(ndimage.mean(liver.astype(float), labels, index)),
        "liver_surface_distance_mm": np.asarray(ndimage.minimum(depth, labels, index)),
    }
    order = sorted(range(n), key=lambda i: -columns["voxels"][i])
    return [{k: float(v[i]) for k, v in columns.items()} for i in order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesion_columns_match_the_whole_volume_computation_on_random_scenes(seed):
    """Random specks and blobs (some outside the liver, some in its cavity, some on the scan's border) with
    an anisotropic spacing: the cropped, sorted computation equals scipy over the whole volume."""
    rng = np.random.default_rng(seed)
    shape, spacing = (14, 40, 36), (2.5, 0.7, 0.8)
    liver = np.zeros(shape, bool)
    liver[2:12, 6:30, 5:28] = True
    liver[6:8, 15:18, 12:15] = False  # a cavity, filled before the surface is taken
    mask = (rng.random(shape) < 0.04).astype(np.uint8)
    mask[4:7, 10:16, 10:18] = 1
    mask[0, 0:3, 30:36] = 1  # on the scan's border, outside the liver
    probability = rng.random(shape).astype(np.float32)
    uncertainty = rng.random(shape).astype(np.float32)
    votes = rng.integers(0, 8, shape).astype(np.uint8)
    got = lesion_confidence(mask, spacing, probability=probability, uncertainty=uncertainty, votes=votes,
                            n_members=3, liver=liver)
    want = _whole_volume_confidence(mask, spacing, probability, uncertainty, votes, 3, liver)
    assert len(got) == len(want) > 50
    for g, w in zip(got, want):
        assert g["voxels"] == w["voxels"]
        for key in LESION_CONFIDENCE_COLUMNS:
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), key
    # The components of the lesion table, passed in, give the same rows.
    from hepaseg.evaluation.detection import label_lesions_cropped

    again = lesion_confidence(mask, spacing, probability=probability, uncertainty=uncertainty, votes=votes,
                              n_members=3, liver=liver, components=label_lesions_cropped(mask))
    assert again == got


# --- the cascade: anatomical filter, burden, liver ensemble ---------------------------------------------------


def test_lesion_filter_drops_the_decoy_outside_the_liver_and_burden_is_hand_computed(
        lits_dir, toy_checkpoints, tmp_path):  # noqa: F811
    liver_ckpt, tumor_ckpt = toy_checkpoints
    volume, parts = make_scene()
    t, near, n_liver = (int(parts[k].sum()) for k in ("tumor", "near", "liver"))  # 32, 12, 1536 voxels
    plain = predict_case(lits_dir / "volume-0.nii.gz", tmp_path / "a", checkpoint=tumor_ckpt,
                         liver_checkpoint=liver_ckpt, device="cpu", progress=False, save_probabilities=True)
    assert sorted(r["voxels"] for r in plain.lesions) == [near, t]  # the 5 mm margin keeps the decoy
    decoy = next(r for r in plain.lesions if r["voxels"] == near)
    tumour = next(r for r in plain.lesions if r["voxels"] == t)
    # Decoy: rows y 37-38 below the liver's last row 35: 2 mm away, no voxel inside; tumour 4 mm deep (z: 2 slices).
    assert decoy["liver_fraction"] == 0.0 and decoy["liver_surface_distance_mm"] == pytest.approx(2.0)
    assert tumour["liver_fraction"] == 1.0 and tumour["liver_surface_distance_mm"] == pytest.approx(4.0)
    voxel_ml = np.prod(SPACING) / 1000
    assert plain.summary["liver_volume_ml"] == pytest.approx(n_liver * voxel_ml)  # 1536 x 2 mm^3 = 3.072 mL
    assert plain.summary["tumor_volume_ml"] == pytest.approx((t + near) * voxel_ml)
    assert plain.summary["tumor_burden_percent"] == pytest.approx(100 * t / n_liver)  # decoy is outside the liver
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["summary"]["reference_tumor_burden_percent"] == pytest.approx(100 * t / n_liver)
    assert metrics["summary"]["reference_liver_volume_ml"] == pytest.approx(n_liver * voxel_ml)
    liver_p = _nifti_zyx(tmp_path / "a" / "liver_probability.nii.gz")
    # Read back through scl_slope as probabilities: the raw liver stage (HU > 75: liver, tumour and all three
    # decoys), before its largest component is kept.
    assert np.array_equal(liver_p > 0.5, volume.image > 75) and parts["fake_liver"][volume.image > 75].any()

    kept = predict_case(lits_dir / "volume-0.nii.gz", tmp_path / "b", checkpoint=tumor_ckpt,
                        liver_checkpoint=liver_ckpt, device="cpu", progress=False,
                        postprocess=PostProcess(min_liver_fraction=0.5))
    assert [r["voxels"] for r in kept.lesions] == [t] and kept.metrics["dice"] == 1.0
    settings = json.loads((tmp_path / "b" / "lesions.json").read_text())["settings"]["postprocess"]
    assert settings["removed_outside_liver"] == 1 and settings["applied"] == ">= 50 % in liver"
    np.testing.assert_array_equal(_nifti_zyx(tmp_path / "b" / "tumor_mask.nii.gz"), parts["tumor"])


def test_evaluate_volumes_post_processes_and_reports_burden(lits_dir, toy_checkpoints, tmp_path):  # noqa: F811
    liver_ckpt, tumor_ckpt = toy_checkpoints
    _, parts = make_scene()
    t, n_liver = int(parts["tumor"].sum()), int(parts["liver"].sum())
    res = evaluate_volumes(tumor_ckpt, [lits_dir / "volume-0.nii.gz"], liver_checkpoint=[liver_ckpt],
                           out=tmp_path / "ev", postprocess=PostProcess(min_liver_fraction=0.5))
    (row,) = res.rows
    assert row["dice"] == 1.0 and row["tumor_burden_percent"] == pytest.approx(100 * t / n_liver)
    assert row["reference_tumor_burden_percent"] == pytest.approx(100 * t / n_liver)
    assert res.summary["burden"]["liver_volume_ml"] == pytest.approx(n_liver * 2 / 1000)
    with open(res.paths["csv"]) as fh:
        assert "tumor_burden_percent" in next(csv.DictReader(fh))
    with pytest.raises(HepasegError, match="--min-liver-fraction: needs a predicted liver"):
        evaluate_volumes(tumor_ckpt, [lits_dir / "volume-0.nii.gz"], out=tmp_path / "x",
                         postprocess=PostProcess(min_liver_fraction=0.5))


def test_cascade_liver_stage_as_an_ensemble(scene):  # noqa: F811
    volume, parts = scene
    # Above(75 HU) and two constant "no liver" members: the mean is 1/3 on the liver -> no liver.
    third = predict_cascade([Above(), Constant(-30.0), Constant(-30.0)], LIVER_OPTS, Band(), TUMOR_OPTS, volume,
                            progress=False)
    assert not third.liver.any() and third.warnings and third.n_members == (3, 1)
    # Two members that both find the liver: the same masks as one, probabilities kept with details=True.
    both = predict_cascade([Above(), Above(hu=70.0)], LIVER_OPTS, [Band(), Band()], TUMOR_OPTS, volume,
                           progress=False, details=True)
    one = predict_cascade(Above(), LIVER_OPTS, Band(), TUMOR_OPTS, volume, progress=False)
    np.testing.assert_array_equal(both.liver, one.liver)
    np.testing.assert_array_equal(both.tumor, one.tumor)
    np.testing.assert_array_equal(both.tumor, both.tumor_probability > 0.5)  # mask == probability > threshold
    assert np.all(both.tumor_votes[both.tumor > 0] == 0b11) and np.all(both.tumor_uncertainty == 0.0)
    assert both.liver_probability.shape == volume.image.shape


def test_cli_evaluate_volumes_with_post_processing_options(lits_dir, toy_checkpoints, tmp_path):  # noqa: F811
    liver_ckpt, tumor_ckpt = toy_checkpoints
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tumor_ckpt), "--liver-checkpoint",
                                   str(liver_ckpt), "--volumes", str(lits_dir / "volume-0.nii.gz"), "--out",
                                   str(tmp_path / "ev"), "--min-liver-fraction", "0.5", "--fill-holes", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)["volumes"]
    assert payload["cases"][0]["dice"] == 1.0
    assert payload["options"]["postprocess"]["applied"] == "fill holes, >= 50 % in liver"
    refused = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tumor_ckpt), "--data", str(tmp_path),
                                       "--fill-holes"])
    assert refused.exit_code == 1 and "post-processing works on whole volumes" in refused.output
