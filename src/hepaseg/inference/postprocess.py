"""Post-processing of a predicted tumour mask: hole filling, small lesions, lesions outside the liver.

Every step is OFF by default (:class:`PostProcess()` changes nothing): which ones help is to be
decided by measurement on cross-validation (``hepaseg crossval --postprocess ...``, see
:mod:`hepaseg.experiments.crossval_scoring`), as nnU-Net decides its post-processing on its folds.
The steps, in this order:

1. ``fill_holes``: in every axial slice, background pixels of the tumour mask that no
   4-connected path of background links to the slice's border become tumour
   (:func:`scipy.ndimage.binary_fill_holes`). In 2D on purpose: the networks predict slice by
   slice, so a necrotic core they miss is a hole in the slices it crosses, which a 3D fill
   would not close wherever the hole is open in z.
2. Lesions are the 26-connected 3D components of the mask (as the lesion table counts them).
3. ``min_lesion_mm3``: lesions smaller than this volume (voxel count x voxel volume, mm^3) are
   dropped (0 = off). For scale: a sphere of 5 mm diameter is 65 mm^3, 10 mm 524 mm^3.
4. ``min_liver_fraction``: lesions with less than this share of their voxels inside the
   PREDICTED liver are dropped (0 = off; 0.5 drops lesions lying mostly outside the liver: the
   gallbladder, the stomach wall, bowel). Needs a liver mask (the cascade's liver stage). This
   is a lesion-level rule, unlike the cascade's voxel-level 5 mm margin, which keeps any voxel
   near the liver and so keeps most of a gallbladder lying against it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from hepaseg.errors import HepasegError

__all__ = ["PostProcess", "component_labels", "postprocess_mask"]

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class PostProcess:
    """Post-processing options (module docstring); the defaults change nothing.

    Attributes:
        min_lesion_mm3: drop lesions smaller than this, mm^3 (>= 0; 0 = off).
        fill_holes: fill holes of the mask slice by slice.
        min_liver_fraction: drop lesions with less than this share of voxels in the predicted
            liver, in [0, 1] (0 = off; 0.5 = "mostly outside").
    """

    min_lesion_mm3: float = 0.0
    fill_holes: bool = False
    min_liver_fraction: float = 0.0

    def __post_init__(self) -> None:
        size = float(self.min_lesion_mm3)
        if not (math.isfinite(size) and size >= 0):
            raise HepasegError(f"--min-lesion-mm3: expected a volume >= 0 in mm^3, got {self.min_lesion_mm3!r}")
        fraction = float(self.min_liver_fraction)
        if not (math.isfinite(fraction) and 0 <= fraction <= 1):
            raise HepasegError(f"--min-liver-fraction: expected a fraction in [0, 1], got {self.min_liver_fraction!r}")
        object.__setattr__(self, "min_lesion_mm3", size)
        object.__setattr__(self, "min_liver_fraction", fraction)
        object.__setattr__(self, "fill_holes", bool(self.fill_holes))

    @property
    def is_off(self) -> bool:
        return not (self.min_lesion_mm3 or self.fill_holes or self.min_liver_fraction)

    @property
    def needs_liver(self) -> bool:
        return self.min_liver_fraction > 0

    def describe(self) -> str:
        """Short text, e.g. ``"none"`` or ``"fill holes, >= 50 mm3, >= 50 % in liver"``."""
        if self.is_off:
            return "none"
        parts = ["fill holes"] if self.fill_holes else []
        if self.min_lesion_mm3:
            parts.append(f">= {self.min_lesion_mm3:g} mm3")
        if self.min_liver_fraction:
            parts.append(f">= {100 * self.min_liver_fraction:g} % in liver")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> PostProcess:
        """``"none"`` or comma-separated ``fill_holes``, ``min_lesion_mm3=V``, ``min_liver_fraction=F``.

        Dashes may replace underscores (``fill-holes,min-lesion-mm3=50``).

        Raises:
            HepasegError: an unknown key or a bad value.
        """
        spec = text.strip().lower().replace("-", "_")
        if spec in ("", "none", "off"):
            return cls()
        values: dict[str, Any] = {}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            key, sep, raw = part.partition("=")
            if key == "fill_holes" and not sep:
                values["fill_holes"] = True
            elif key in ("min_lesion_mm3", "min_liver_fraction") and sep and re.fullmatch(r"[0-9.eE+]+", raw):
                values[key] = float(raw)
            else:
                raise HepasegError(
                    f"--postprocess: cannot parse {part!r} in {text!r}: expected 'none' or comma-separated "
                    "fill_holes, min_lesion_mm3=V (mm^3), min_liver_fraction=F (0-1)"
                )
        return cls(**values)


def component_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a 3D mask: ``(labels int32 (z, y, x), n)`` as the lesion table labels them."""
    labels, n = ndimage.label(np.asarray(mask) != 0, structure=_STRUCTURE_26)
    return labels, int(n)


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        out[z] = ndimage.binary_fill_holes(mask[z])
    return out


def postprocess_mask(
    mask: np.ndarray,
    spacing: Sequence[float],
    options: PostProcess,
    *,
    liver: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply :class:`PostProcess` to a tumour mask (module docstring for the steps).

    Args:
        mask: ``(z, y, x)`` tumour mask (nonzero = tumour).
        spacing: voxel size in mm ``(z, y, x)``.
        options: what to do; ``PostProcess()`` returns the mask unchanged (as uint8).
        liver: predicted liver ``(z, y, x)`` (nonzero = liver), needed by ``min_liver_fraction``.

    Returns:
        ``(mask, info)``: uint8 {0, 1} mask and ``{"settings", "filled_voxels", "lesions_before",
        "removed_small", "removed_outside_liver", "lesions_after"}`` (lesion counts only when a
        lesion rule is on, else None).

    Raises:
        HepasegError: ``min_liver_fraction`` without a liver mask, or a liver of another shape.
    """
    mask = np.asarray(mask) != 0
    info: dict[str, Any] = {"settings": options.as_dict(), "filled_voxels": 0, "lesions_before": None,
                            "removed_small": 0, "removed_outside_liver": 0, "lesions_after": None}
    if options.needs_liver:
        if liver is None:
            raise HepasegError("--min-liver-fraction: needs a predicted liver: expected the liver-first cascade "
                               "(--liver-checkpoint), got no liver stage. Drop --min-liver-fraction or add a "
                               "liver stage")
        if np.shape(liver) != mask.shape:
            raise HepasegError(f"liver mask: expected shape {mask.shape}, got {np.shape(liver)}")
    if options.fill_holes:
        filled = _fill_holes_2d(mask)
        info["filled_voxels"] = int(np.count_nonzero(filled & ~mask))
        mask = filled
    if options.min_lesion_mm3 or options.min_liver_fraction:
        labels, n = component_labels(mask)
        info["lesions_before"] = n
        keep = np.ones(n + 1, dtype=bool)
        keep[0] = False
        if n:
            voxels = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            if options.min_lesion_mm3:
                small = voxels * float(np.prod(np.asarray(spacing, np.float64))) < options.min_lesion_mm3
                info["removed_small"] = int(small.sum())
                keep[1:] &= ~small
            if options.min_liver_fraction:
                inside = np.bincount(labels[np.asarray(liver) != 0], minlength=n + 1)[1:]
                outside = (inside / voxels < options.min_liver_fraction) & keep[1:]
                info["removed_outside_liver"] = int(outside.sum())
                keep[1:] &= ~outside
        mask = keep[labels]
        info["lesions_after"] = int(keep.sum())
    return mask.astype(np.uint8), info
