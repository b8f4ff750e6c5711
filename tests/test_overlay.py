"""Overlay outlines: contours for a tumour, one shaded image for a speckled (badly trained) mask."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from hepaseg.inference.overlay import MAX_OUTLINE_PIXELS, _outline, draw_overlay


def _axes():
    return Figure().subplots()


def test_a_tumour_is_outlined_and_speckle_is_shaded():
    yy, xx = np.mgrid[:128, :128]
    disc = (yy - 64) ** 2 + (xx - 64) ** 2 <= 30**2
    ax = _axes()
    _outline(ax, disc, "#ff3030", 1.0)
    assert len(ax.images) == 0 and len(ax.collections) + len(ax.patches) + len(ax.lines) > 0

    speckle = np.random.default_rng(0).random((256, 256)) < 0.25
    edge = speckle & ~(np.roll(speckle, 1, 0) & np.roll(speckle, -1, 0) & np.roll(speckle, 1, 1)
                       & np.roll(speckle, -1, 1))
    assert edge.sum() > MAX_OUTLINE_PIXELS  # the case the rule is for
    ax = _axes()
    _outline(ax, speckle, "#ff3030", 1.0)
    assert len(ax.images) == 1 and len(ax.collections) == 0
    rgba = ax.images[0].get_array()
    assert rgba.shape == (256, 256, 4)
    np.testing.assert_array_equal(rgba[..., 3] > 0, speckle)  # shaded exactly where the mask is


def test_speckled_overlay_is_written(tmp_path):
    rng = np.random.default_rng(1)
    image = np.full((4, 96, 96), -1000.0, np.float32)
    pred = rng.random(image.shape) < 0.3
    path = draw_overlay(image, pred, tmp_path / "o.png", gt_mask=pred[::-1].copy(), n=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
