"""Synthetic liver tumours painted into training slices (Hu et al., CVPR 2023).

Hu Q., Chen Y., Xiao J., et al., "Label-Free Liver Tumor Segmentation", CVPR 2023,
and their code (github.com/MrGiovanni/SyntheticTumors, ``TumorGenerated/utils.py``):
an online augmentation that darkens textured, elastically deformed ellipsoids
inside the liver and labels them tumour. The released code works in 3D at 1 mm
isotropic voxels in HU; hepaseg trains on prepared 2D slices, so this module
paints the 2D cross-sections of such lesions into a slice in the prepared
``[0, 1]`` window units (``v = (HU - lo) / (hi - lo)``).

Recipe and where each number comes from (``[code]`` = SyntheticTumors ``utils.py``,
lengths there are voxels of a 1 mm grid, i.e. mm):

* **Location** [code ``random_select``]: lesion centres are drawn uniformly from
  the liver mask eroded by ``erode_mm = 2`` mm (the code erodes with a 5 x 5
  kernel at 1 mm). Ours also excludes real tumours dilated by ``margin_mm = 5`` mm
  (our choice; the code only paints livers without tumour): synthetic lesions,
  their blurred edges included, never touch or overlap a real one.
* **Size classes** [code ``get_fixed_geo``]: nominal radius ``r`` = 4 / 8 / 16 /
  32 mm (tiny / small / medium / large); each lesion's three semi-axes are drawn
  uniformly from ``[0.75 r, 1.25 r]`` mm. One class per sample, drawn uniformly
  from ``sizes`` (the code's ``tumor_prob`` is uniform too; its ``mix`` class is
  not offered). Semi-axes are converted to pixels with the slice's pixel size.
* **Count** per sample: the code puts 3-10 tiny, 3-10 small, 2-5 medium or 1-3
  large lesions in a whole VOLUME at random heights, so a single slice crosses
  only some of them. Per SLICE we draw 1-4 tiny, 1-3 small, 1-2 medium and 1
  large (our choice, :data:`SIZE_CLASSES`), each centred on the slice.
* **Shape** [code ``get_ellipsoid`` + ``elasticdeform.deform_random_grid(points=3)``]:
  an axis-aligned ellipse warped by a smooth displacement field: a 3 x 3 grid of
  N(0, sigma_e) mm displacements over the lesion's ``4 r`` box, cubic-spline
  interpolated. sigma_e ~ U(0.5, 1) / U(1, 2) / U(3, 6) / U(5, 10) mm by class
  (the code's ``sigma`` values in voxels).
* **Context channels**: a prepared item has ``2K + 1`` channels, channel ``j``
  being original slice ``z + j - K``. A lesion centred on the middle slice with
  z semi-axis ``rz`` appears in channel ``j`` as the ellipsoid's cross-section at
  height ``dz = |j - K| * slice_mm``: the in-plane semi-axes shrink by
  ``sqrt(1 - (dz / rz)^2)`` (same deformation field, same texture), and vanish
  for ``dz >= rz``. Only the middle slice has a label, so every channel is
  painted within the middle slice's liver mask (the liver barely moves over a
  few mm).
* **Texture** [code ``get_texture``]: uniform noise smoothed with a Gaussian of
  sigma_a ~ U(3, 15) mm, min-max scaled to ``[base, base + scale]`` with
  base ~ U(0.04, 0.06), scale ~ U(0.19, 0.21); a Bernoulli draw with that
  probability map, smoothed with sigma_b ~ U(3, 5) mm (p = 0.7) or U(5, 8) mm;
  scaled so that its mean where it exceeds 0.12 is u0 ~ U(0.5, 0.55); clipped to
  [0, 1]. Drawn in 2D at the prepared pixel size (a 2D Bernoulli field is
  grainier than a slice of the code's 3D one).
* **Darkening** [code ``get_tumor``]: ``HU -= D * texture * blur(lesion)`` inside
  the liver only, with D ~ U(65, 145) HU and the lesion mask blurred by a
  Gaussian of sigma ~ U(1, 2) mm (the blurred edge). In window units D becomes
  ``D / (hi - lo)``; results are clipped to [0, 1].
* **Label**: the painted pixels = the (deformed) lesion mask inside the allowed
  region ``liver & ~dilate(real tumour, margin)`` become 2. The image changes
  only there and in a ring around them of at most ``round(3 sigma_edge / pixel)``
  pixels in each axis (Chebyshev distance: the separable Gaussian is truncated
  at 3 sigma), and never outside the allowed region.
* **Calibration** (:func:`measure_tumor_contrast`, :func:`calibrated_darkening`):
  the median darkening of a painted lesion is about ``D * TEXTURE_GAIN`` (texture
  times blurred edge, see :data:`TEXTURE_GAIN`). Given a measured tumour-to-liver
  contrast ``C`` (median liver HU minus median tumour HU, median over training
  patients) the darkening range becomes ``C / TEXTURE_GAIN * [65/105, 145/105]``:
  centred so synthetic lesions match the data's contrast, with the paper's
  relative spread (65-145 is 105 HU +- 38 %), not clipped to 65-145 (a
  non-contrast or late-phase dataset may need less or more). Without a usable
  measurement (no tumour labels, as in the label-free setting, or ``C < 5`` HU,
  i.e. tumours not hypodense) the paper's 65-145 HU is used.

Not reproduced: the paper's mass effect and capsule brightening (absent from the
released code), and the ``mix`` class.

Lesion families beyond hypodense (``families``; ``hepaseg train --synthetic-family``)
--------------------------------------------------------------------------------------
Hu et al. paint only lesions darker than the liver, and so do the training patients
we have (portal-venous CT, tumours 37-50 HU below liver). A network trained on them
learns "dark blob near the liver" and misses hepatocellular carcinomas scanned in
the arterial phase (brighter than liver) or a late phase (nearly iso-dense). Each
painted sample draws ONE family uniformly from ``families`` (one patient's lesions
in one phase tend to look alike), then paints all its lesions (same placement,
sizes, shape, edge and texture as above) with that family's contrast. ``C`` is the
lesion-to-liver contrast (painted HU minus original HU): for the families other than
``hypo`` the texture-times-edge field ``f`` is rescaled so that the MEDIAN of ``C * f
/ median(f)`` over the middle channel's lesion pixels is exactly the drawn ``C``
(so "requested contrast" has a measurable meaning; ``hypo`` keeps the paper's
``D * f``, and the default ``families=("hypo",)`` draws exactly what it always did).

* ``hypo`` -- the recipe above (hypovascular metastases, portal-venous phase).
* ``hyper`` -- arterial-phase hyperenhancement: ``C ~ U(+15, +60)`` HU.
  LI-RADS v2018 (American College of Radiology, CT/MRI LI-RADS v2018 core) makes
  "nonrim arterial phase hyperenhancement" (APHE), enhancement unequivocally
  greater than liver, a major feature of HCC; Senturk et al. (Cancer Imaging 2014,
  14:9) saw hypervascular HCC in 87 % of 83 patients. The numbers are OUR choice:
  the range brackets the +25 HU measured on the arterial-phase HCC patient of
  hepaseg issue 11 and stays below the HU of arterial-phase vessels.
* ``iso`` -- nearly iso-attenuating: ``C ~ U(-10, +10)`` HU. Liu et al.
  (AJR 2013;200:84-89, "quantitatively defining washout in HCC") found a delayed-phase
  liver-to-lesion attenuation ratio of median 1.21 for HCC and 1.01 for other
  arterially enhancing lesions, with 1.07 as the washout cut-off: about 7 HU at a
  delayed-phase liver of ~100 HU. +-10 HU (our choice) covers that grey zone and the
  -8 HU late-phase patient of issue 11. Such a lesion is recognisable only by its
  texture and outline, which is the point.
* ``rim`` -- a ring at the lesion's border with the opposite sign of its core:
  a bright ring around a darker core (LI-RADS "enhancing capsule" around a washed-out
  HCC in the portal-venous/delayed phase; "rim APHE" of metastases and
  cholangiocarcinoma) or a dark ring around a brighter core (a hypoattenuating
  pseudocapsule or washout rim around an enhancing nodule). Sign of the ring
  +1 or -1 with p 0.5; ring contrast ``|C_rim| ~ U(15, 40)`` HU, core contrast
  ``|C| ~ U(5, 30)`` HU of the other sign, ring width ``U(1, 3)`` mm, smooth (no
  texture: LI-RADS describes the capsule as "smooth, uniform, sharp"), its edge
  blurred by a Gaussian of 0.5 mm. All four ranges are OUR choice (LI-RADS defines
  the features visually, without HU or thickness).
* ``deposit`` -- a treated lesion holding iodised oil (Lipiodol) after
  chemoembolisation: a hypoattenuating (necrotic) core ``C ~ U(-40, -10)`` HU
  (our choice) with dense deposits covering a fraction ``U(0.1, 1.0)`` of it
  (retention is graded <50 %, 50-90 % and >90 % of the tumour: Cancer Imaging
  2016, doi:10.1186/s40644-016-0090-4) and ``C_dep ~ U(130, 435)`` HU above the
  liver: the mean +- 1 sd of the tumour-to-liver contrast of Lipiodol on
  multidetector CT, 283 +- 152 HU (J Vasc Interv Radiol 2013;24:1837-44,
  doi:10.1016/j.jvir.2013.08.017; densely retained nodules reach >= 365 HU,
  Cardiovasc Intervent Radiol 1993;16:209-13). In the usual -200..250 HU window
  most deposits saturate at 1. The deposits are the top ``fraction`` of a smooth
  random field (Gaussian-filtered noise, sigma ``U(2, 4)`` mm, our choice) over the
  lesion, edges blurred by 0.5 mm. The whole lesion, deposits included, is labelled
  tumour (our choice: the deposit sits in the treated tumour).

:meth:`SyntheticTumors.paint` returns what was drawn (family, contrasts, sizes),
so tests can check that painted lesions have the requested sign and size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "FAMILIES",
    "FAMILY_CONTRAST_HU",
    "PAPER_DARKENING_HU",
    "SIZE_CLASSES",
    "TEXTURE_GAIN",
    "SyntheticTumors",
    "calibrated_darkening",
    "measure_tumor_contrast",
    "synthetic_calibration",
]

PAPER_DARKENING_HU = (65.0, 145.0)  # [code get_tumor]: difference = U(65, 145)
# name: (nominal radius mm, lesions per slice (min, max), elastic sigma range mm)
SIZE_CLASSES: dict[str, tuple[float, tuple[int, int], tuple[float, float]]] = {
    "tiny": (4.0, (1, 4), (0.5, 1.0)),
    "small": (8.0, (1, 3), (1.0, 2.0)),
    "medium": (16.0, (1, 2), (3.0, 6.0)),
    "large": (32.0, (1, 1), (5.0, 10.0)),
}
# Median over painted pixels of texture * blurred edge, i.e. median darkening / D. Measured by
# painting 400 samples of each size class at 1.6 mm pixels (the usual 512 px x 0.7 mm -> 224 px):
# 0.33 tiny (mostly edge), 0.39 small, 0.43 medium, 0.44 large; 0.40 is their mean.
TEXTURE_GAIN = 0.40
#: Lesion families (module docstring "Lesion families beyond hypodense").
FAMILIES = ("hypo", "iso", "hyper", "rim", "deposit")
#: Median lesion-to-liver contrast ``C`` (HU) of the core, per family other than ``hypo``
#: (``hypo`` uses ``contrast_hu``; ``rim``: the magnitude, its sign opposite to the ring's).
FAMILY_CONTRAST_HU: dict[str, tuple[float, float]] = {
    "iso": (-10.0, 10.0),
    "hyper": (15.0, 60.0),
    "rim": (5.0, 30.0),
    "deposit": (-40.0, -10.0),
}
RIM_CONTRAST_HU = (15.0, 40.0)  # |ring contrast|, our choice
RIM_WIDTH_MM = (1.0, 3.0)  # our choice
DEPOSIT_CONTRAST_HU = (130.0, 435.0)  # 283 +- 152 HU (JVIR 2013)
DEPOSIT_FRACTION = (0.1, 1.0)  # share of the lesion covered by deposits
DEPOSIT_FIELD_SIGMA_MM = (2.0, 4.0)  # smoothness of the deposit pattern, our choice
_SHARP_EDGE_MM = 0.5  # blur of ring and deposit edges
_MIN_CONTRAST_HU = 5.0  # below this a measured contrast is not a hypodense-tumour contrast
_EDGE_TRUNCATE = 3.0  # Gaussian edge blur truncated at 3 sigma: the changed ring is finite


def calibrated_darkening(contrast_hu: float | None) -> tuple[float, float]:
    """Darkening range ``(lo, hi)`` in HU for a measured tumour-to-liver contrast (module docstring).

    ``None`` or a contrast below 5 HU gives the paper's ``(65, 145)``.

    >>> calibrated_darkening(None)
    (65.0, 145.0)
    >>> [round(v, 1) for v in calibrated_darkening(42.0)]  # = 0.40 * 105: the paper's centre
    [65.0, 145.0]
    """
    if contrast_hu is None or not math.isfinite(contrast_hu) or contrast_hu < _MIN_CONTRAST_HU:
        return PAPER_DARKENING_HU
    centre = contrast_hu / TEXTURE_GAIN
    mid = sum(PAPER_DARKENING_HU) / 2
    return (centre * PAPER_DARKENING_HU[0] / mid, centre * PAPER_DARKENING_HU[1] / mid)


# --- calibration ---------------------------------------------------------------------------------

_HIST_LO, _HIST_HI, _HIST_BIN = -2000.0, 4000.0, 0.1  # pooled medians from HU histograms (0.1 HU bins)
_HIST_BINS = int((_HIST_HI - _HIST_LO) / _HIST_BIN)


def _hist(values_hu: np.ndarray) -> np.ndarray:
    idx = np.clip(((values_hu - _HIST_LO) / _HIST_BIN).astype(np.int64), 0, _HIST_BINS - 1)
    return np.bincount(idx, minlength=_HIST_BINS)


def _hist_median(hist: np.ndarray) -> float | None:
    total = int(hist.sum())
    if total == 0:
        return None
    k = int(np.searchsorted(np.cumsum(hist), (total + 1) / 2))
    return _HIST_LO + (k + 0.5) * _HIST_BIN


def measure_tumor_contrast(
    source: str | os.PathLike | Sequence[Any], *, split: str | None = "train"
) -> dict[str, Any]:
    """Tumour-to-liver contrast of labelled CT: median liver HU minus median tumour HU.

    Args:
        source: a prepared directory (``hepaseg prepare`` output: the centre channel of each
            shard, converted back to HU with the manifest's window; values at the window's ends
            are clipped, which does not move a median that lies inside it), or a sequence of
            :class:`hepaseg.io.Volume` with labels (HU as stored).
        split: for a prepared directory, the split whose cases are measured (``"train"``,
            default; ``None`` = all cases). Ignored for volumes.

    Returns:
        ``{"cases": {id: {"liver_hu", "tumor_hu", "contrast_hu", "liver_pixels",
        "tumor_pixels"}}, "pooled": {same keys over all pixels of all cases},
        "contrast_hu": median over cases with both liver and tumour of their
        contrast (each patient counts once; None when no case has both),
        "darkening_hu": :func:`calibrated_darkening` of it, "calibrated": bool}``.
        Liver = label 1 (liver without tumour), tumour = label 2.
    """
    items: list[tuple[str, np.ndarray, np.ndarray]] = []  # (id, liver HU values, tumour HU values)
    if isinstance(source, (str, os.PathLike)):
        from hepaseg.data.prepare import read_manifest

        root = Path(source)
        manifest = read_manifest(root)
        lo, hi = (float(v) for v in manifest["options"]["window"])
        k = int(manifest["options"]["context_slices"])
        for case in manifest["cases"]:
            if (split is not None and case.get("split") != split) or not case.get("n_slices"):
                continue
            with np.load(root / case["shard"]) as npz:
                image, label = npz["image"][:, k].astype(np.float32), npz["label"]
            hu = lo + image * (hi - lo)
            items.append((case["id"], hu[label == 1], hu[label == 2]))
    else:
        for vol in source:
            if vol.label is None:
                continue
            items.append((vol.case_id, vol.image[vol.label == 1], vol.image[vol.label == 2]))

    cases: dict[str, dict[str, Any]] = {}
    liver_hist = np.zeros(_HIST_BINS, np.int64)
    tumor_hist = np.zeros(_HIST_BINS, np.int64)
    for case_id, liver, tumor in items:
        liver_hist += _hist(liver)
        tumor_hist += _hist(tumor)
        liver_hu = float(np.median(liver)) if liver.size else None
        tumor_hu = float(np.median(tumor)) if tumor.size else None
        cases[case_id] = {
            "liver_hu": liver_hu,
            "tumor_hu": tumor_hu,
            "contrast_hu": liver_hu - tumor_hu if liver_hu is not None and tumor_hu is not None else None,
            "liver_pixels": int(liver.size),
            "tumor_pixels": int(tumor.size),
        }
    pooled_liver, pooled_tumor = _hist_median(liver_hist), _hist_median(tumor_hist)
    pooled = {
        "liver_hu": pooled_liver,
        "tumor_hu": pooled_tumor,
        "contrast_hu": pooled_liver - pooled_tumor if pooled_liver is not None and pooled_tumor is not None else None,
        "liver_pixels": int(liver_hist.sum()),
        "tumor_pixels": int(tumor_hist.sum()),
    }
    contrasts = [c["contrast_hu"] for c in cases.values() if c["contrast_hu"] is not None]
    contrast = float(np.median(contrasts)) if contrasts else None
    darkening = calibrated_darkening(contrast)
    return {
        "cases": cases,
        "pooled": pooled,
        "contrast_hu": contrast,
        "darkening_hu": list(darkening),
        "calibrated": contrast is not None and contrast >= _MIN_CONTRAST_HU,
    }


def synthetic_calibration(root: str | os.PathLike, *, split: str = "train") -> dict[str, Any]:
    """Compact calibration record for a run: contrast and darkening range measured on ``split``.

    ``{"contrast_hu", "darkening_hu": [lo, hi], "calibrated", "cases_measured", "source"}``;
    ``source`` is ``"measured on <split>"`` or ``"paper (no tumour labels in <split>)"``.
    """
    full = measure_tumor_contrast(root, split=split)
    n = sum(1 for c in full["cases"].values() if c["contrast_hu"] is not None)
    return {
        "contrast_hu": full["contrast_hu"],
        "darkening_hu": full["darkening_hu"],
        "calibrated": full["calibrated"],
        "cases_measured": n,
        "source": f"measured on {split}" if full["calibrated"] else f"paper (no usable tumour labels in {split})",
    }


# --- the transform -------------------------------------------------------------------------------


def _disc(radius_px: float) -> np.ndarray:
    r = max(0, int(math.ceil(radius_px)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= radius_px**2 + 1e-9


def _pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    pair = (float(value), float(value)) if np.isscalar(value) else tuple(float(v) for v in value)
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"{name}: expected a positive number or (y, x) pair in mm, got {value!r}")
    return pair  # type: ignore[return-value]


class SyntheticTumors:
    """Paint synthetic lesions into a prepared slice (see the module docstring): hypodense as
    Hu et al., and optionally iso-, hyper-attenuating, rimmed and Lipiodol-laden ones (``families``).

    Args:
        prob: probability of painting a sample, in [0, 1] (0 = no-op).
        window: ``(lo, hi)`` HU window of the prepared images.
        pixel_mm: in-plane pixel size at the PREPARED resolution, mm, a number or ``(y, x)``:
            original spacing * original size / prepared size. Overridable per call.
        slice_mm: distance between neighbouring context channels (original z spacing), mm.
        contrast_hu: ``(lo, hi)`` range of the darkening D in HU (default the paper's
            (65, 145); see :func:`calibrated_darkening`).
        sizes: size classes to draw from (uniformly), a subset of :data:`SIZE_CLASSES`.
        count: ``(min, max)`` lesions per painted sample; ``None`` (default) = per class.
        erode_mm: liver erosion for lesion centres (2 mm).
        margin_mm: distance kept from real tumours (5 mm).
        families: lesion families to draw from, uniformly per painted sample, a non-empty
            subset of :data:`FAMILIES` (default ``("hypo",)``: the paper's dark lesions only).

    Call: ``(image (C, H, W) float in [0, 1], label (H, W) uint8 {0, 1, 2}, rng)`` ->
    ``(image float32 (C, H, W), label uint8 (H, W))``, new arrays (inputs are never
    modified). Unchanged when not drawn (``rng.random() >= prob``), when the slice has
    less eligible liver (eroded, away from real tumours) than a disc of the drawn
    class's smallest radius ``0.75 r``, or when nothing ends up painted.
    """

    def __init__(
        self,
        prob: float,
        *,
        window: Sequence[float],
        pixel_mm: float | Sequence[float] = 1.0,
        slice_mm: float = 1.0,
        contrast_hu: Sequence[float] = PAPER_DARKENING_HU,
        sizes: Sequence[str] = ("tiny", "small", "medium", "large"),
        count: Sequence[int] | None = None,
        erode_mm: float = 2.0,
        margin_mm: float = 5.0,
        families: Sequence[str] = ("hypo",),
    ) -> None:
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"prob: expected a probability in [0, 1], got {prob!r}")
        lo, hi = (float(w) for w in window)
        if not lo < hi:
            raise ValueError(f"window: expected (lo, hi) HU with lo < hi, got {window!r}")
        c_lo, c_hi = (float(c) for c in contrast_hu)
        if not 0 <= c_lo <= c_hi:
            raise ValueError(f"contrast_hu: expected (lo, hi) HU with 0 <= lo <= hi, got {contrast_hu!r}")
        unknown = [s for s in sizes if s not in SIZE_CLASSES]
        if not sizes or unknown:
            raise ValueError(f"sizes: expected a non-empty subset of {list(SIZE_CLASSES)}, got {list(sizes)!r}")
        families = tuple(families)
        bad = [f for f in families if f not in FAMILIES]
        if not families or bad or len(set(families)) != len(families):
            raise ValueError(f"families: expected a non-empty subset of {list(FAMILIES)} without repeats, "
                             f"got {list(families)!r}")
        if count is not None and (len(count) != 2 or not 1 <= int(count[0]) <= int(count[1])):
            raise ValueError(f"count: expected (min, max) with 1 <= min <= max, got {count!r}")
        if slice_mm <= 0 or erode_mm < 0 or margin_mm < 0:
            raise ValueError(f"slice_mm > 0, erode_mm >= 0, margin_mm >= 0 expected, got "
                             f"{slice_mm}, {erode_mm}, {margin_mm}")
        self.prob = float(prob)
        self.window = (lo, hi)
        self.pixel_mm = _pair(pixel_mm, "pixel_mm")
        self.slice_mm = float(slice_mm)
        self.contrast_hu = (c_lo, c_hi)
        self.sizes = tuple(sizes)
        self.count = None if count is None else (int(count[0]), int(count[1]))
        self.erode_mm, self.margin_mm = float(erode_mm), float(margin_mm)
        self.families = families

    def __repr__(self) -> str:
        return (f"SyntheticTumors(prob={self.prob}, window={self.window}, contrast_hu={self.contrast_hu}, "
                f"sizes={self.sizes}, families={self.families})")

    def __call__(
        self,
        image: np.ndarray,
        label: np.ndarray,
        rng: np.random.Generator,
        *,
        pixel_mm: float | Sequence[float] | None = None,
        slice_mm: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        image, label, _ = self.paint(image, label, rng, pixel_mm=pixel_mm, slice_mm=slice_mm)
        return image, label

    def paint(
        self,
        image: np.ndarray,
        label: np.ndarray,
        rng: np.random.Generator,
        *,
        pixel_mm: float | Sequence[float] | None = None,
        slice_mm: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
        """As calling the transform, plus what was drawn (None when nothing was painted).

        The record: ``family``, ``size`` (class), ``lesions`` (``[{"centre_px": (y, x),
        "semi_axes_mm": (ry, rx, rz)}]``), ``contrast_hu`` (``hypo``: the darkening D, negative;
        otherwise the requested median core contrast C), and for ``rim``: ``rim_hu``,
        ``rim_width_mm``; for ``deposit``: ``deposit_hu``, ``deposit_fraction``.
        """
        image = np.array(image, dtype=np.float32)  # copies: the caller's (cached) arrays stay intact
        label = np.array(label, dtype=np.uint8)
        if image.ndim != 3 or label.shape != image.shape[1:]:
            raise ValueError(f"image (C, H, W) and label (H, W) expected, got {image.shape} and {label.shape}")
        if self.prob == 0.0 or rng.random() >= self.prob:
            return image, label, None
        py, px = self.pixel_mm if pixel_mm is None else _pair(pixel_mm, "pixel_mm")
        dz_mm = self.slice_mm if slice_mm is None else float(slice_mm)
        # Only a choice among several families draws from rng: "hypo" alone repeats the old stream.
        family = self.families[int(rng.integers(len(self.families)))] if len(self.families) > 1 else self.families[0]
        size = self.sizes[int(rng.integers(len(self.sizes)))]
        radius, default_count, elastic = SIZE_CLASSES[size]
        n_min, n_max = self.count or default_count

        liver = label > 0
        allowed = label == 1
        if (label == 2).any() and self.margin_mm > 0:
            margin = _ellipse_struct(self.margin_mm / py, self.margin_mm / px)
            allowed &= ~ndimage.binary_dilation(label == 2, structure=margin)
        centres = allowed
        if self.erode_mm > 0:
            centres = allowed & ndimage.binary_erosion(
                liver, structure=_ellipse_struct(self.erode_mm / py, self.erode_mm / px)
            )
        if centres.sum() * py * px < math.pi * (0.75 * radius) ** 2:
            return image, label, None  # no room for a lesion of this class
        candidates = np.argwhere(centres)

        n_ch = image.shape[0]
        k = (n_ch - 1) // 2
        lesions = [np.zeros(label.shape, bool) for _ in range(n_ch)]
        drawn: list[dict[str, Any]] = []
        for _ in range(int(rng.integers(n_min, n_max + 1))):
            cy, cx = candidates[int(rng.integers(len(candidates)))]
            ry, rx, rz = rng.uniform(0.75 * radius, 1.25 * radius, 3)
            drawn.append({"centre_px": (int(cy), int(cx)), "semi_axes_mm": (float(ry), float(rx), float(rz))})
            sigma_e = rng.uniform(*elastic)
            half = 2.0 * 1.25 * radius  # the code's 4 r box around the centre, mm
            hy, hx = int(math.ceil(half / py)), int(math.ceil(half / px))
            y0, y1 = max(0, cy - hy), min(label.shape[0], cy + hy + 1)
            x0, x1 = max(0, cx - hx), min(label.shape[1], cx + hx + 1)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            ymm, xmm = (yy - cy) * py, (xx - cx) * px  # (h, w) mm from the centre
            dy, dx = _displacement((2 * hy + 1, 2 * hx + 1), sigma_e, rng)  # mm, on the full box
            dy = dy[y0 - (cy - hy) : y1 - (cy - hy), x0 - (cx - hx) : x1 - (cx - hx)]
            dx = dx[y0 - (cy - hy) : y1 - (cy - hy), x0 - (cx - hx) : x1 - (cx - hx)]
            for j in range(n_ch):
                dz = abs(j - k) * dz_mm
                if dz >= rz:
                    continue  # the ellipsoid does not reach this context slice
                f = math.sqrt(1.0 - (dz / rz) ** 2)
                inside = ((ymm + dy) / (f * ry)) ** 2 + ((xmm + dx) / (f * rx)) ** 2 <= 1.0
                lesions[j][y0:y1, x0:x1] |= inside
        lesions = [m & allowed for m in lesions]
        if not lesions[k].any():
            return image, label, None

        lo, hi = self.window
        darkening_hu = rng.uniform(*self.contrast_hu)
        depth = darkening_hu / (hi - lo)  # D in window units
        sigma_edge = rng.uniform(1.0, 2.0)
        texture = _texture(label.shape, (py, px), rng)
        info: dict[str, Any] = {"family": family, "size": size, "lesions": drawn}
        edges = [
            None if not lesions[j].any() else ndimage.gaussian_filter(
                lesions[j].astype(np.float32), sigma=(sigma_edge / py, sigma_edge / px), truncate=_EDGE_TRUNCATE
            )
            for j in range(n_ch)
        ]
        if family == "hypo":
            info["contrast_hu"] = -float(darkening_hu)
            changes = [None if e is None else -depth * texture * e for e in edges]
        else:
            changes = self._family_changes(family, lesions, edges, texture, k, (py, px), rng, info)
        for j in range(n_ch):
            if changes[j] is not None:
                image[j] = np.where(allowed, np.clip(image[j] + changes[j], 0.0, 1.0), image[j])
        label[lesions[k]] = 2
        return image, label, info

    def _family_changes(self, family, lesions, edges, texture, k, pixel_mm, rng, info) -> list[np.ndarray | None]:
        """Per channel, the change (window units) that paints ``family`` (module docstring); fills ``info``."""
        lo, hi = self.window
        py, px = pixel_mm
        c_lo, c_hi = FAMILY_CONTRAST_HU[family]
        contrast = rng.uniform(c_lo, c_hi)
        ring_sign = 0.0
        if family == "rim":
            ring_sign = 1.0 if rng.random() < 0.5 else -1.0
            contrast = -ring_sign * contrast  # the core has the other sign
            info["rim_hu"] = float(ring_sign * rng.uniform(*RIM_CONTRAST_HU))
            info["rim_width_mm"] = float(rng.uniform(*RIM_WIDTH_MM))
        elif family == "deposit":
            info["deposit_hu"] = float(rng.uniform(*DEPOSIT_CONTRAST_HU))
            info["deposit_fraction"] = float(rng.uniform(*DEPOSIT_FRACTION))
            sigma_d = rng.uniform(*DEPOSIT_FIELD_SIGMA_MM)
            field = ndimage.gaussian_filter(rng.uniform(0.0, 1.0, texture.shape), sigma=(sigma_d / py, sigma_d / px))
            # The deposits are the top `fraction` of the field over the middle channel's lesion.
            threshold = np.quantile(field[lesions[k]], 1.0 - info["deposit_fraction"])
        info["contrast_hu"] = float(contrast)
        # Rescale texture * edge so its median over the middle lesion is 1: C is then the median contrast.
        f_mid = (texture * edges[k])[lesions[k]]
        scale = float(np.median(f_mid))
        if scale < 1e-3:  # a texture that is ~0 over most of the lesion: fall back to its mean
            scale = max(float(f_mid.mean()), 1e-3)
        sharp = (_SHARP_EDGE_MM / py, _SHARP_EDGE_MM / px)
        changes: list[np.ndarray | None] = []
        for j, lesion in enumerate(lesions):
            if edges[j] is None:
                changes.append(None)
                continue
            change = contrast / scale * texture * edges[j]  # HU
            if family == "rim":
                width = info["rim_width_mm"]
                inner = ndimage.binary_erosion(lesion, structure=_ellipse_struct(width / py, width / px))
                ring = ndimage.gaussian_filter((lesion & ~inner).astype(np.float32), sharp, truncate=_EDGE_TRUNCATE)
                ring = np.minimum(ring * 2.0, 1.0)  # a 1 mm ring blurred by 0.5 mm keeps its full contrast inside
                change = (1.0 - ring) * change + ring * info["rim_hu"]
            elif family == "deposit":
                deposit = ndimage.gaussian_filter(
                    (lesion & (field >= threshold)).astype(np.float32), sharp, truncate=_EDGE_TRUNCATE
                )
                change = (1.0 - deposit) * change + deposit * info["deposit_hu"]
            changes.append((change / (hi - lo)).astype(np.float32))
        return changes


def _ellipse_struct(ry_px: float, rx_px: float) -> np.ndarray:
    """Boolean structuring element: the ellipse of semi-axes ``(ry, rx)`` pixels (at least 3 x 3)."""
    hy, hx = max(1, int(math.ceil(ry_px))), max(1, int(math.ceil(rx_px)))
    yy, xx = np.mgrid[-hy : hy + 1, -hx : hx + 1]
    return (yy / max(ry_px, 1.0)) ** 2 + (xx / max(rx_px, 1.0)) ** 2 <= 1.0


def _displacement(shape: tuple[int, int], sigma_mm: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random displacement (mm) over ``shape``: a 3 x 3 grid of N(0, sigma) cubic-spline interpolated
    (as elasticdeform.deform_random_grid with points=3)."""
    grid = rng.normal(0.0, sigma_mm, (2, 3, 3))
    gy = np.linspace(0, 2, shape[0])
    gx = np.linspace(0, 2, shape[1])
    coords = np.stack(np.meshgrid(gy, gx, indexing="ij"))
    return tuple(ndimage.map_coordinates(g, coords, order=3, mode="nearest") for g in grid)  # type: ignore[return-value]


def _texture(shape: tuple[int, int], pixel_mm: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """The code's ``get_texture`` in 2D at ``pixel_mm`` (module docstring): float32 ``shape`` in [0, 1]."""
    py, px = pixel_mm
    sigma_a = rng.uniform(3.0, 15.0)
    a = ndimage.gaussian_filter(rng.uniform(0.0, 1.0, shape), sigma=(sigma_a / py, sigma_a / px))
    a = rng.uniform(0.19, 0.21) * (a - a.min()) / max(a.max() - a.min(), 1e-12) + rng.uniform(0.04, 0.06)
    b = (a > rng.uniform(0.0, 1.0, shape)).astype(np.float64)
    sigma_b = rng.uniform(3.0, 5.0) if rng.random() < 0.7 else rng.uniform(5.0, 8.0)
    b = ndimage.gaussian_filter(b, sigma=(sigma_b / py, sigma_b / px))
    above = b > 0.12
    mean = b[above].mean() if above.any() else max(b.mean(), 1e-12)
    return np.clip(rng.uniform(0.5, 0.55) / mean * b, 0.0, 1.0).astype(np.float32)

