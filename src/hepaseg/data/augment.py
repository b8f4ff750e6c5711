"""Training augmentation presets (MONAI dictionary transforms on ``{"image": (C, H, W), "mask": (1, H, W)}``).

Presets (``hepaseg train --augment``):

* ``basic`` (``augment=True``, hepaseg's original set): flips along each in-plane
  axis (p 0.5 each), a random affine (p 0.5; rotation +-15 degrees, scaling
  0.85-1.15 per axis), an intensity shift of +-0.1 (p 0.5).
* ``nnunet``: nnU-Net v2's default 2D training augmentation
  (``nnUNetTrainer.get_training_transforms``), probabilities per sample:

  ========== ======================================================== =====
  family     transform (nnU-Net v2 default)                           p
  ========== ======================================================== =====
  spatial    rotation, uniform in +-180 degrees (2D, square patches)  0.2
  spatial    isotropic scaling (zoom) 0.7-1.4                         0.2
  noise      additive Gaussian noise, variance ~ U(0, 0.1)            0.1
  blur       Gaussian blur, sigma ~ U(0.5, 1) pixels                  0.2
  intensity  multiplicative brightness 0.75-1.25                      0.15
  intensity  contrast 0.75-1.25 around the mean, range preserved      0.15
  lowres     simulated low resolution: nearest down to 0.5-1, back up 0.25
  gamma      gamma 0.7-1.5 of the inverted image (stats retained)     0.1
  gamma      gamma 0.7-1.5 (stats retained)                           0.3
  mirror     flip along each in-plane axis                            0.5
  ========== ======================================================== =====

  nnU-Net applies noise, brightness and contrast to CT z-scored with the
  dataset's foreground (liver + tumour) mean and std. hepaseg images are the
  HU window scaled to [0, 1], so these run in a z-scored view ``(v - m) / s``
  with ``m = (ref_mean_hu - lo) / (hi - lo)``, ``s = ref_std_hu / (hi - lo)``
  (defaults 100 HU and 40 HU: the order of a contrast-enhanced liver's
  foreground statistics, e.g. nnU-Net's Task03 Liver fingerprint) and are
  mapped back and clipped to [0, 1]. Without it a variance of 0.1 in window
  units (std 0.32 = 140 HU) would bury the ~40 HU tumour contrast.
  Deviations: MONAI's noise draws its std (not variance) uniformly in
  [0, sqrt(0.1)]; blur and low resolution act on all channels together
  (nnU-Net: each channel with p 0.5); the spatial transforms zero-pad (0 = the
  window's lower end) and keep the size; masks use nearest interpolation; the
  result is clipped to [0, 1] (the window) at the end.
* ``none`` (``augment=False``): no augmentation.

``off`` (``--no-aug FAMILY``, repeatable) removes families from a preset for
ablations: ``spatial``, ``noise``, ``blur``, ``intensity``, ``lowres``,
``gamma``, ``mirror`` (``basic`` has spatial, intensity and mirror).

Liver enhancement (:class:`LiverEnhancement`, ``hepaseg train --liver-enhancement P``)
is separate from the presets because it needs the label map (liver and tumour), which
the MONAI transforms never see: it runs on the raw item, after the synthetic tumours.
It shifts the liver parenchyma (label 1) by ``delta ~ U(-60, +20)`` HU and the
tumour (label 2) by ``lambda * delta`` with ``lambda ~ U(0, 1)``, the rest of the
slice unchanged, both masks' edges blurred by a Gaussian of 1 mm so no step appears
at the liver's border. Why: how bright the liver is depends on the phase and the
contrast dose -- about 50-70 HU unenhanced (Husarik et al., Acad Radiol 2011;18:822-7:
mean 56-58 HU), 56 +- 14 HU more in the portal phase in non-cirrhotic livers and
40 +- 12 HU more in cirrhotic ones (Naruo et al., Radiat Med 2007;25:106-12) -- while
both training patients are portal-venous (liver 113-119 HU, tumours 69-76 HU). A
-60 HU shift (our choice: about the whole portal-phase enhancement) takes such a liver
back to unenhanced values, which turns their hypodense tumours iso- or hyperdense;
+20 HU (our choice) covers a denser bolus. ``lambda`` (our choice) spans lesions that
gain nothing (hypovascular, ``lambda = 0``: their contrast changes by ``delta``) to
lesions that enhance like the parenchyma (``lambda = 1``: contrast unchanged). It is
not a phase simulator (vessels, spleen and kidneys do not change); its purpose is that
"darker than the liver" stops being the only cue for tumour.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "AUGMENT_FAMILIES",
    "AUGMENT_PRESETS",
    "LIVER_ENHANCEMENT_HU",
    "LiverEnhancement",
    "ZScored",
    "build_augmentation",
    "normalize_augment",
]

AUGMENT_PRESETS = ("basic", "nnunet", "none")
AUGMENT_FAMILIES = ("spatial", "noise", "blur", "intensity", "lowres", "gamma", "mirror")
LIVER_ENHANCEMENT_HU = (-60.0, 20.0)  # shift of the liver parenchyma, HU (module docstring)
_ENHANCEMENT_EDGE_MM = 1.0


def normalize_augment(augment: bool | str | None) -> str:
    """``True``/``"basic"`` -> ``"basic"``, ``False``/``None``/``"none"`` -> ``"none"``, ``"nnunet"``."""
    if augment is True:
        return "basic"
    if augment is False or augment is None:
        return "none"
    if isinstance(augment, str) and augment.lower() in AUGMENT_PRESETS:
        return augment.lower()
    raise ValueError(f"augment: expected True, False or one of {AUGMENT_PRESETS}, got {augment!r}")


def _check_off(off: Iterable[str]) -> tuple[str, ...]:
    off = tuple(off or ())
    bad = [f for f in off if f not in AUGMENT_FAMILIES]
    if bad:
        raise ValueError(f"aug_off: unknown augmentation families {bad}: expected some of {AUGMENT_FAMILIES}")
    return off


class _Clip:
    """Clip the image to [0, 1] (the window's range) after transforms that can overshoot it."""

    def set_random_state(self, seed: int | None = None, state=None) -> _Clip:
        return self

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        d["image"] = torch.as_tensor(d["image"]).clamp(0.0, 1.0)
        return d


class ZScored:
    """Run intensity transforms on ``(image - mean) / std`` and map back, clipped to [0, 1].

    A MONAI-style dictionary transform wrapping a list of randomizable ``transforms``
    (``set_random_state`` is forwarded, so seeding works as for the others).
    """

    def __init__(self, transforms: Sequence, *, mean: float, std: float, key: str = "image") -> None:
        if std <= 0:
            raise ValueError(f"std: expected > 0, got {std}")
        self.transforms, self.mean, self.std, self.key = list(transforms), float(mean), float(std), key

    def set_random_state(self, seed: int | None = None, state=None) -> ZScored:
        seeds = np.random.SeedSequence(seed).generate_state(len(self.transforms))
        for t, s in zip(self.transforms, seeds):
            t.set_random_state(seed=int(s))
        return self

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        x = (torch.as_tensor(d[self.key]).float() - self.mean) / self.std
        d[self.key] = x
        for t in self.transforms:
            d = t(d)
        d[self.key] = (torch.as_tensor(d[self.key]).as_subclass(torch.Tensor) * self.std + self.mean).clamp(0.0, 1.0)
        return d


def _flips(keys: Sequence[str]) -> list:
    from monai.transforms import RandFlipd

    return [RandFlipd(keys=keys, prob=0.5, spatial_axis=0), RandFlipd(keys=keys, prob=0.5, spatial_axis=1)]


def build_augmentation(
    preset: bool | str = "basic",
    *,
    off: Iterable[str] = (),
    window: Sequence[float] = (-200.0, 250.0),
    ref_mean_hu: float = 100.0,
    ref_std_hu: float = 40.0,
):
    """The MONAI ``Compose`` of ``preset`` without the families in ``off`` (``None`` for no transform).

    Args:
        preset: ``"basic"`` (or True), ``"nnunet"``, ``"none"`` (or False).
        off: families to leave out (:data:`AUGMENT_FAMILIES`).
        window: the prepared images' HU window ``(lo, hi)`` (for the z-scored view).
        ref_mean_hu, ref_std_hu: the z-scoring reference, HU (module docstring).

    Returns ``Compose`` on ``{"image": (C, H, W), "mask": (1, H, W)}`` float tensors, or
    ``None`` when nothing is left.
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandRotated,
        RandScaleIntensityd,
        RandScaleIntensityFixedMeand,
        RandShiftIntensityd,
        RandSimulateLowResolutiond,
        RandZoomd,
    )

    preset = normalize_augment(preset)
    off = set(_check_off(off))
    keys = ("image", "mask")
    img = ("image",)
    families: list[tuple[str, list]] = []
    if preset == "basic":
        families = [
            ("mirror", _flips(keys)),
            ("spatial", [RandAffined(
                keys=keys,
                prob=0.5,
                rotate_range=(math.radians(15.0),),
                scale_range=(0.15, 0.15),  # MONAI scales by 1 + U(-0.15, 0.15) per axis
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )]),
            ("intensity", [RandShiftIntensityd(keys=img, prob=0.5, offsets=0.1)]),
        ]
    elif preset == "nnunet":
        lo, hi = (float(w) for w in window)
        zs = {"mean": (ref_mean_hu - lo) / (hi - lo), "std": ref_std_hu / (hi - lo)}
        families = [
            ("spatial", [
                RandRotated(keys=keys, range_x=math.pi, prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros"),
                RandZoomd(keys=keys, prob=0.2, min_zoom=0.7, max_zoom=1.4, mode=("bilinear", "nearest"),
                          padding_mode="constant", keep_size=True),
            ]),
            ("noise", [ZScored([RandGaussianNoised(keys=img, prob=0.1, std=math.sqrt(0.1))], **zs)]),
            ("blur", [RandGaussianSmoothd(keys=img, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), prob=0.2)]),
            ("intensity", [ZScored([
                RandScaleIntensityd(keys=img, factors=0.25, prob=0.15),  # x * (1 + U(-0.25, 0.25))
                RandScaleIntensityFixedMeand(keys=img, factors=0.25, prob=0.15, fixed_mean=True,
                                             preserve_range=True),
            ], **zs)]),
            ("lowres", [RandSimulateLowResolutiond(keys=img, prob=0.25, zoom_range=(0.5, 1.0),
                                                   downsample_mode="nearest", upsample_mode="bicubic")]),
            ("gamma", [
                RandAdjustContrastd(keys=img, prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
                RandAdjustContrastd(keys=img, prob=0.3, gamma=(0.7, 1.5), invert_image=False, retain_stats=True),
            ]),
            ("mirror", _flips(keys)),
        ]
    transforms = [t for name, ts in families if name not in off for t in ts]
    if preset == "nnunet" and transforms:
        transforms.append(_Clip())  # bicubic up-sampling and gamma with retained stats can leave [0, 1]
    return Compose(transforms) if transforms else None


class LiverEnhancement:
    """Vary the liver's own enhancement (module docstring): parenchyma ``+delta``, tumour ``+lambda delta``.

    Args:
        prob: probability per item, in [0, 1] (0 = no-op).
        window: ``(lo, hi)`` HU window of the prepared images (shifts in HU become window units).
        shift_hu: ``(lo, hi)`` range of ``delta``, HU (default :data:`LIVER_ENHANCEMENT_HU`).
        lesion_share: ``(lo, hi)`` range of ``lambda`` (default (0, 1)).
        pixel_mm: in-plane pixel size at the prepared resolution, mm (number or ``(y, x)``),
            for the 1 mm edge blur; overridable per call.

    Call: ``(image (C, H, W) float in [0, 1], label (H, W) uint8 {0, 1, 2}, rng)`` -> ``(image
    float32 (C, H, W), info)`` with ``info = {"shift_hu": delta, "lesion_share": lambda}`` or None
    when not drawn or the slice has no liver. A new array; every channel gets the middle
    slice's shift (the liver barely moves over a few mm); clipped to [0, 1].
    """

    def __init__(
        self,
        prob: float,
        *,
        window: Sequence[float],
        shift_hu: Sequence[float] = LIVER_ENHANCEMENT_HU,
        lesion_share: Sequence[float] = (0.0, 1.0),
        pixel_mm: float | Sequence[float] = 1.0,
    ) -> None:
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"prob: expected a probability in [0, 1], got {prob!r}")
        lo, hi = (float(w) for w in window)
        if not lo < hi:
            raise ValueError(f"window: expected (lo, hi) HU with lo < hi, got {window!r}")
        s_lo, s_hi = (float(v) for v in shift_hu)
        if not s_lo <= s_hi:
            raise ValueError(f"shift_hu: expected (lo, hi) HU with lo <= hi, got {shift_hu!r}")
        l_lo, l_hi = (float(v) for v in lesion_share)
        if not 0.0 <= l_lo <= l_hi <= 1.0:
            raise ValueError(f"lesion_share: expected (lo, hi) with 0 <= lo <= hi <= 1, got {lesion_share!r}")
        self.prob, self.window = float(prob), (lo, hi)
        self.shift_hu, self.lesion_share = (s_lo, s_hi), (l_lo, l_hi)
        self.pixel_mm = _pixel_pair(pixel_mm)

    def __repr__(self) -> str:
        return f"LiverEnhancement(prob={self.prob}, shift_hu={self.shift_hu}, lesion_share={self.lesion_share})"

    def __call__(
        self,
        image: np.ndarray,
        label: np.ndarray,
        rng: np.random.Generator,
        *,
        pixel_mm: float | Sequence[float] | None = None,
    ) -> tuple[np.ndarray, dict | None]:
        from scipy import ndimage

        image = np.array(image, dtype=np.float32)  # a copy: cached shards stay intact
        label = np.asarray(label)
        if image.ndim != 3 or label.shape != image.shape[1:]:
            raise ValueError(f"image (C, H, W) and label (H, W) expected, got {image.shape} and {label.shape}")
        if self.prob == 0.0 or rng.random() >= self.prob or not (label > 0).any():
            return image, None
        py, px = self.pixel_mm if pixel_mm is None else _pixel_pair(pixel_mm)
        delta = float(rng.uniform(*self.shift_hu))
        share = float(rng.uniform(*self.lesion_share))
        sigma = (_ENHANCEMENT_EDGE_MM / py, _ENHANCEMENT_EDGE_MM / px)
        parenchyma = ndimage.gaussian_filter((label == 1).astype(np.float32), sigma, truncate=3.0)
        lesion = ndimage.gaussian_filter((label == 2).astype(np.float32), sigma, truncate=3.0)
        lo, hi = self.window
        change = ((delta * parenchyma + share * delta * lesion) / (hi - lo)).astype(np.float32)  # (H, W)
        return np.clip(image + change[None], 0.0, 1.0), {"shift_hu": delta, "lesion_share": share}


def _pixel_pair(value: float | Sequence[float]) -> tuple[float, float]:
    pair = (float(value), float(value)) if np.isscalar(value) else tuple(float(v) for v in value)
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"pixel_mm: expected a positive number or (y, x) pair in mm, got {value!r}")
    return pair  # type: ignore[return-value]
