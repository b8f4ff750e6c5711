"""The cascade's geometry steps against scipy references on random masks (they now run on cc3d and edt)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from hepaseg.inference.cascade import dilate_mm, largest_component


def _naive_largest(mask):
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))  # argmax: the lowest label among ties


def test_largest_component_equals_ndimage_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(60):
        shape = tuple(int(rng.integers(3, 20)) for _ in range(3))
        mask = rng.random(shape) < rng.uniform(0.02, 0.2)
        if trial % 3 == 0:  # two equal cubes: the first in C order wins
            mask[:] = False
            mask[0:2, 0:2, 0:2] = mask[-2:, -2:, -2:] = True
        np.testing.assert_array_equal(largest_component(mask), _naive_largest(mask))


def test_dilation_equals_scipy_distance_transform():
    rng = np.random.default_rng(1)
    for _ in range(60):
        shape = tuple(int(rng.integers(3, 24)) for _ in range(3))
        mask = rng.random(shape) < rng.uniform(0.005, 0.1)
        spacing = tuple(float(v) for v in rng.choice([0.5, 0.7, 0.8, 1.0, 1.6, 2.5, 5.0], size=3))
        radius = float(rng.choice([0.0, 0.7, 1.0, 2.5, 5.0, 7.3]))
        if not mask.any():
            continue
        # Voxels at exactly the radius are inside. scipy's float64 distance of such a tie can land a
        # hair above it (0.7 mm x 2 and 0.8 mm x 6 give 5.000000000000001 mm), so the reference
        # allows 1e-9 relative; no two distinct distances here are that close.
        expected = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius * (1 + 1e-9)
        np.testing.assert_array_equal(dilate_mm(mask, spacing, radius), expected)
