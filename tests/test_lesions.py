"""Lesion table: hand-built volumes with known sizes, spacing and positions."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from hepaseg.inference.lesions import LESION_CSV_COLUMNS, axial_feret_diameter, lesion_table, lesions_to_csv

SPACING = (2.0, 0.5, 0.8)  # (z, y, x) mm, deliberately anisotropic in-plane


def _two_cubes():
    mask = np.zeros((20, 40, 50), dtype=np.uint8)
    mask[2:6, 5:9, 10:14] = 1  # 4 x 4 x 4 = 64 voxels
    mask[10:12, 20:23, 30:35] = 1  # 2 x 3 x 5 = 30 voxels
    return mask


def test_two_cubes_exact_sizes_positions_and_order():
    rows = lesion_table(_two_cubes(), SPACING)
    assert [r["id"] for r in rows] == [1, 2]
    big, small = rows
    voxel_ml = 2.0 * 0.5 * 0.8 / 1000.0
    assert big["voxels"] == 64 and small["voxels"] == 30
    assert big["volume_ml"] == pytest.approx(64 * voxel_ml)
    assert small["volume_ml"] == pytest.approx(30 * voxel_ml)
    # Centroid = mean index * spacing: (2+5)/2=3.5, (5+8)/2=6.5, (10+13)/2=11.5.
    assert big["centroid_mm"] == pytest.approx([3.5 * 2.0, 6.5 * 0.5, 11.5 * 0.8])
    assert small["centroid_mm"] == pytest.approx([10.5 * 2.0, 21.0 * 0.5, 32.0 * 0.8])
    assert (big["first_slice"], big["last_slice"]) == (2, 5)
    assert (small["first_slice"], small["last_slice"]) == (10, 11)
    assert big["centroid_ras"] is None


def test_square_section_diameter_within_one_pixel():
    rows = lesion_table(_two_cubes(), SPACING)
    # 4 x 4 pixel square of 0.5 x 0.8 mm: diagonal sqrt(2^2 + 3.2^2) mm; within one (larger) pixel.
    diag = math.hypot(4 * 0.5, 4 * 0.8)
    assert abs(rows[0]["max_axial_diameter_mm"] - diag) <= 0.8
    # Exact value of the documented estimator (pixel-edge midpoints): sqrt((3*0.5)^2 + (4*0.8)^2)
    # or sqrt((4*0.5)^2 + (3*0.8)^2), whichever is larger.
    assert rows[0]["max_axial_diameter_mm"] == pytest.approx(max(math.hypot(1.5, 3.2), math.hypot(2.0, 2.4)))
    # 3 x 5 rectangle of the second cube.
    assert abs(rows[1]["max_axial_diameter_mm"] - math.hypot(3 * 0.5, 5 * 0.8)) <= 0.8


@pytest.mark.parametrize("radius", [4, 9, 15])
def test_disc_diameter_within_one_pixel(radius):
    s = 0.7
    yy, xx = np.mgrid[-20:21, -20:21]
    disc = (yy**2 + xx**2) <= radius**2
    assert abs(axial_feret_diameter(disc, (s, s)) - 2 * radius * s) <= s + 1e-9


def test_feret_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((15, 12)) < 0.35
        ys, xs = np.nonzero(mask)
        sy, sx = 0.6, 1.1
        # Independent reference: all pairs of edge midpoints, no hull.
        pts = np.concatenate(
            [np.stack([(ys + dy) * sy, (xs + dx) * sx], 1) for dy, dx in ((-0.5, 0), (0.5, 0), (0, -0.5), (0, 0.5))]
        )
        ref = max(math.dist(p, q) for p in pts for q in pts)
        assert axial_feret_diameter(mask, (sy, sx)) == pytest.approx(ref)


def test_diameter_is_max_over_slices_and_reports_that_slice():
    mask = np.zeros((5, 30, 30), bool)
    mask[1, 10:13, 10:13] = True
    mask[2, 8:18, 10:13] = True  # longest section: 10 x 3 pixels
    mask[3, 10:12, 10:12] = True
    (row,) = lesion_table(mask, (1.0, 1.0, 1.0))
    assert row["diameter_slice"] == 2
    assert row["max_axial_diameter_mm"] == pytest.approx(math.hypot(10, 2))


def test_world_centroid_from_a_rotated_affine():
    mask = np.zeros((6, 7, 8), bool)
    mask[1:3, 2:4, 4:8] = True  # mean index (z, y, x) = (1.5, 2.5, 5.5)
    # LPS-like flip of x and y plus an offset: (i, j, k) = (x, y, z) -> world.
    affine = np.array([[-0.8, 0, 0, 100.0], [0, -0.5, 0, 50.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])
    (row,) = lesion_table(mask, SPACING, affine)
    assert row["centroid_ras"] == pytest.approx([100 - 0.8 * 5.5, 50 - 0.5 * 2.5, -30 + 2.0 * 1.5])


def test_connectivity_26_joins_diagonal_neighbours_6_does_not():
    mask = np.zeros((4, 4, 4), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # touch at a corner only
    assert len(lesion_table(mask, (1, 1, 1))) == 1
    assert len(lesion_table(mask, (1, 1, 1), connectivity=1)) == 2


def test_empty_mask_and_bad_arguments():
    assert lesion_table(np.zeros((3, 4, 4)), (1, 1, 1)) == []
    with pytest.raises(ValueError, match="3D"):
        lesion_table(np.zeros((4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        lesion_table(np.zeros((3, 4, 4)), (1, 0, 1))


def test_csv_has_one_row_per_lesion_and_blank_world_columns_without_affine():
    rows = lesion_table(_two_cubes(), SPACING)
    parsed = list(csv.DictReader(io.StringIO(lesions_to_csv(rows))))
    assert list(parsed[0]) == LESION_CSV_COLUMNS
    assert [int(r["voxels"]) for r in parsed] == [64, 30]
    assert float(parsed[0]["centroid_x_mm"]) == pytest.approx(11.5 * 0.8, abs=0.01)
    assert parsed[0]["centroid_r_mm"] == ""


def _brute_force_diameter(section: np.ndarray, spacing_yx) -> float:
    ys, xs = np.nonzero(section)
    sy, sx = spacing_yx
    pts = np.concatenate(
        [np.stack([(ys + dy) * sy, (xs + dx) * sx], 1) for dy, dx in ((-0.5, 0), (0.5, 0), (0, -0.5), (0, 0.5))]
    )
    d = pts[:, None] - pts[None]
    return float(np.sqrt((d**2).sum(-1)).max())


def test_many_components_match_a_per_component_brute_force():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    mask = rng.random((6, 40, 40)) < 0.25
    mask[2:5, 5:30, 8:35] = True  # one big blob (more than 8 rows per section) among the specks
    rows = lesion_table(mask, SPACING)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert len(rows) == n
    by_first_voxel = {}
    for lab in range(1, n + 1):
        comp = labels == lab
        diam = [_brute_force_diameter(comp[z], SPACING[1:]) if comp[z].any() else -1 for z in range(6)]
        idx = np.argwhere(comp)
        by_first_voxel[lab] = (comp.sum(), max(diam), idx.mean(0) * SPACING)
    expected = sorted(by_first_voxel.values(), key=lambda v: -v[0])
    for row, (voxels, diam, centroid) in zip(rows, expected):
        assert row["voxels"] == voxels
        assert row["max_axial_diameter_mm"] == pytest.approx(diam)
        assert row["centroid_mm"] == pytest.approx(centroid.tolist())


def _naive_lesion_table(mask, spacing, affine=None, connectivity=3):
    """The implementation before cc3d and cropping: ndimage.label on the whole volume, then per slice
    bincounts over every pixel; the diameter of each section on its own (axial_feret_diameter)."""
    from scipy import ndimage

    spacing_arr = np.asarray(spacing, dtype=np.float64)
    labels, n = ndimage.label(mask != 0, structure=ndimage.generate_binary_structure(3, connectivity))
    if n == 0:
        return []
    counts, sums = np.zeros(n + 1), np.zeros((3, n + 1))
    first_z, last_z = np.full(n + 1, -1), np.full(n + 1, -1)
    best_diam, best_z = np.full(n + 1, -1.0), np.zeros(n + 1, dtype=np.int64)
    yy, xx = np.indices(labels.shape[1:], dtype=np.float64)
    for z in range(labels.shape[0]):
        flat = labels[z].ravel()
        c = np.bincount(flat, minlength=n + 1)
        first_z[(c > 0) & (first_z < 0)] = z
        last_z[c > 0] = z
        counts += c
        sums[0] += c * z
        sums[1] += np.bincount(flat, weights=yy.ravel(), minlength=n + 1)
        sums[2] += np.bincount(flat, weights=xx.ravel(), minlength=n + 1)
        labs = np.unique(flat[flat > 0])
        diam = np.array([axial_feret_diameter(labels[z] == lab, spacing_arr[1:]) for lab in labs])
        better = diam > best_diam[labs]
        best_diam[labs[better]] = diam[better]
        best_z[labs[better]] = z
    centroid_idx = (sums / np.maximum(counts, 1)).T
    ras = None
    if affine is not None:
        ras = (np.c_[centroid_idx[:, ::-1], np.ones(n + 1)] @ np.asarray(affine, dtype=np.float64).T)[:, :3]
    rows = [
        {
            "voxels": int(counts[lab]),
            "volume_ml": float(int(counts[lab]) * (float(np.prod(spacing_arr)) / 1000.0)),
            "centroid_mm": (centroid_idx * spacing_arr)[lab].tolist(),
            "centroid_ras": None if ras is None else ras[lab].tolist(),
            "max_axial_diameter_mm": float(best_diam[lab]),
            "diameter_slice": int(best_z[lab]),
            "first_slice": int(first_z[lab]),
            "last_slice": int(last_z[lab]),
        }
        for lab in range(1, n + 1)
    ]
    rows.sort(key=lambda r: -r["voxels"])
    return [{"id": i, **row} for i, row in enumerate(rows, start=1)]


@pytest.mark.parametrize("connectivity", [1, 2, 3])
def test_cropped_cc3d_table_equals_the_whole_volume_implementation(connectivity):
    # Bit-for-bit the same rows (floats included) as ndimage.label over the whole volume, on speckle,
    # blobs away from the origin (the crop's offset) and ties in volume (the order of the first voxel).
    rng = np.random.default_rng(7 + connectivity)
    for trial in range(40):
        shape = tuple(int(rng.integers(2, 24)) for _ in range(3))
        mask = rng.random(shape) < rng.uniform(0.02, 0.4)
        if trial % 2:
            mask[:] = False
            for _ in range(3):
                z, y, x = (int(rng.integers(0, s)) for s in shape)
                mask[z : z + 2, y : y + 3, x : x + 3] = True  # equal boxes where they fit: ties
        spacing = tuple(float(rng.uniform(0.3, 3.0)) for _ in range(3))
        affine = rng.normal(size=(4, 4))
        ours = lesion_table(mask, spacing, affine, connectivity=connectivity)
        assert ours == _naive_lesion_table(mask, spacing, affine, connectivity)
