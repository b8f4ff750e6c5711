"""A small, seeded, CT-like phantom with liver and tumour labels (for tests and demos).

:func:`make_phantom` builds a :class:`~hepaseg.io.volume.Volume` in Hounsfield
units whose intensities resemble a contrast abdominal CT:

====================  ===========  =====
structure             HU           label
====================  ===========  =====
air (background)      -1000        0
body (soft tissue)    ~40 +- 10    0
spine-ish bright blob ~400         0
liver ellipsoid       ~60 +- 10    1
tumours (spheres)     ~20 +- 10    2
====================  ===========  =====

Tumours are hypodense spheres of a few mm radius placed entirely inside the
liver (so no tumour voxel lies outside it, as in 3D-IRCADb and LiTS).
:func:`write_phantom_dataset` writes several phantoms as NIfTI in the real LiTS
or MSD Task03 layout, so readers and the prepare step are tested on the same
file layouts users have.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from hepaseg.io.atomic import atomic_path, write_json_atomic
from hepaseg.io.volume import LABEL_LIVER, LABEL_TUMOR, Volume

__all__ = ["PHANTOM_HU", "make_phantom", "write_phantom_dataset"]

#: Mean HU of each phantom structure (noise sd 10 HU inside the body).
PHANTOM_HU = {"air": -1000.0, "body": 40.0, "liver": 60.0, "tumor": 20.0, "bone": 400.0}
_NOISE_SD_HU = 10.0


def _ellipsoid(shape: tuple[int, int, int], centre, semi_axes) -> np.ndarray:
    """Boolean (z, y, x) mask of an axis-aligned ellipsoid (centre and semi-axes in voxels)."""
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    d = sum(((g - c) / max(a, 1e-6)) ** 2 for g, c, a in zip((zz, yy, xx), centre, semi_axes))
    return d <= 1.0


def make_phantom(
    shape: tuple[int, int, int] = (24, 96, 96),
    *,
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
    n_tumors: int = 3,
    seed: int = 0,
) -> Volume:
    """Build a seeded CT-like phantom volume with LiTS-convention labels.

    Args:
        shape: ``(z, y, x)`` voxels; each at least 8 (default ``(24, 96, 96)``).
        spacing: voxel size in mm, ``(z, y, x)``; all > 0 (default ``(2.5, 0.8, 0.8)``).
        n_tumors: number of hypodense tumour spheres (radius 2.5-6 mm, shrunk when
            the liver is too small), all inside the liver; >= 0 (default 3).
        seed: seed of the numpy generator; same seed -> identical volume.

    Returns:
        A :class:`Volume`: ``image`` float32 ``(z, y, x)`` HU, ``label`` uint8
        ``(z, y, x)`` in {0, 1, 2}, ``affine`` = diag(-spacing_x, -spacing_y,
        spacing_z) (RAS, index order ``(x, y, z)``: hepaseg's canonical LPS orientation, so
        reading a written phantom back returns the same arrays), ``kind="phantom"``,
        ``case_id=f"phantom-{seed}"``.

    Example::

        vol = make_phantom((16, 64, 64), n_tumors=2, seed=1)
        assert vol.label.max() == 2
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape: expected 3 sizes (z, y, x) each >= 8, got {shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing: expected 3 positive mm values (z, y, x), got {spacing}")
    if n_tumors < 0:
        raise ValueError(f"n_tumors: expected >= 0, got {n_tumors}")
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape

    # Body: an elliptic cylinder through all slices; liver on the image's left
    # (patient's right, as in radiological display); spine at the back (large y).
    yy, xx = np.ogrid[:ny, :nx]
    body2d = ((yy - 0.5 * ny) / (0.42 * ny)) ** 2 + ((xx - 0.5 * nx) / (0.46 * nx)) ** 2 <= 1.0
    bone2d = ((yy - 0.78 * ny) / (0.07 * ny)) ** 2 + ((xx - 0.5 * nx) / (0.07 * nx)) ** 2 <= 1.0
    body = np.broadcast_to(body2d, shape)
    bone = np.broadcast_to(bone2d, shape)
    jitter = rng.uniform(-0.03, 0.03, size=3)  # a little seed-dependent anatomy
    liver = _ellipsoid(
        shape,
        centre=((0.5 + jitter[0]) * nz, (0.45 + jitter[1]) * ny, (0.34 + jitter[2]) * nx),
        semi_axes=(0.38 * nz, 0.24 * ny, 0.2 * nx),
    )
    liver &= body

    tumor = np.zeros(shape, dtype=bool)
    if n_tumors:
        # Work inside the liver's bounding box (+1 voxel of background so the
        # border counts): the distance transform of a full 512 x 512 x 400 grid
        # would need several GB.
        box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(liver))
        liver_box = liver[box]
        # Distance (mm) from each liver voxel to the liver border: a sphere of
        # radius r centred where the distance exceeds r lies inside the liver.
        depth_mm = ndimage.distance_transform_edt(liver_box, sampling=spacing)
        tumor_box = np.zeros(liver_box.shape, dtype=bool)
        grids = np.ogrid[tuple(slice(0, n) for n in liver_box.shape)]
        for _ in range(n_tumors):
            radius = float(rng.uniform(2.5, 6.0))
            candidates = np.flatnonzero(depth_mm > radius + 0.5)
            while candidates.size == 0 and radius > 0.5:
                radius /= 2  # small liver: shrink the tumour instead of failing
                candidates = np.flatnonzero(depth_mm > radius + 0.5)
            if candidates.size == 0:
                candidates = np.flatnonzero(liver_box)  # degenerate: one-voxel tumour
            centre = np.unravel_index(rng.choice(candidates), liver_box.shape)
            d2 = sum(((g - c) * sp) ** 2 for g, c, sp in zip(grids, centre, spacing))
            tumor_box |= d2 <= radius**2
        tumor[box] = tumor_box & liver_box

    image = np.full(shape, PHANTOM_HU["air"], dtype=np.float32)
    image[body] = PHANTOM_HU["body"]
    image[bone] = PHANTOM_HU["bone"]
    image[liver] = PHANTOM_HU["liver"]
    image[tumor] = PHANTOM_HU["tumor"]
    noise = rng.normal(0.0, _NOISE_SD_HU, size=shape).astype(np.float32)
    image += np.where(body, noise, np.float32(0.0))

    label = np.zeros(shape, dtype=np.uint8)
    label[liver] = LABEL_LIVER
    label[tumor] = LABEL_TUMOR
    # Canonical LPS (columns to the patient's left, rows to posterior): read back unchanged.
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    return Volume(
        image=image,
        spacing=spacing,  # type: ignore[arg-type]
        affine=affine,
        label=label,
        case_id=f"phantom-{seed}",
        source="",
        kind="phantom",
        meta={"generator": "hepaseg.data.phantom.make_phantom", "seed": seed, "n_tumors": n_tumors},
    )


def _write_nifti(array_zyx: np.ndarray, affine: np.ndarray, path: Path) -> None:
    # NIfTI stores (x, y, z); our arrays are (z, y, x).
    img = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def write_phantom_dataset(
    root: str | os.PathLike,
    layout: str = "lits",
    n_cases: int = 3,
    shape: tuple[int, int, int] = (24, 96, 96),
    seed: int = 0,
    *,
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
    n_tumors: int = 3,
) -> list[Path]:
    """Write ``n_cases`` phantoms as NIfTI in the LiTS or MSD Task03 file layout.

    Case ``i`` (0-based) is ``make_phantom(shape, seed=seed + i, ...)``. Images
    are stored as int16 HU (rounded, as scanners store them), labels as uint8,
    with the phantom's affine ``diag(-sx, -sy, sz)`` (canonical LPS) in both qform and sform.

    Layouts:
        ``lits``: ``root/volume-i.nii.gz`` + ``root/segmentation-i.nii.gz``.
        ``msd``: ``root/imagesTr/liver_i.nii.gz`` + ``root/labelsTr/liver_i.nii.gz``
        and a minimal ``root/dataset.json`` (as MSD Task03 ships).

    Returns:
        The image paths, one per case, in case order.
    """
    if layout not in ("lits", "msd"):
        raise ValueError(f"layout: expected 'lits' or 'msd', got {layout!r}")
    if n_cases < 1:
        raise ValueError(f"n_cases: expected >= 1, got {n_cases}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i in range(n_cases):
        vol = make_phantom(shape, spacing=spacing, n_tumors=n_tumors, seed=seed + i)
        if layout == "lits":
            img_path, lab_path = root / f"volume-{i}.nii.gz", root / f"segmentation-{i}.nii.gz"
        else:
            img_path, lab_path = (
                root / "imagesTr" / f"liver_{i}.nii.gz",
                root / "labelsTr" / f"liver_{i}.nii.gz",
            )
        _write_nifti(np.round(vol.image).astype(np.int16), vol.affine, img_path)
        _write_nifti(vol.label, vol.affine, lab_path)  # type: ignore[arg-type]
        paths.append(img_path)
    if layout == "msd":
        write_json_atomic(
            root / "dataset.json",
            {
                "name": "Liver (hepaseg phantom)",
                "modality": {"0": "CT"},
                "labels": {"0": "background", "1": "liver", "2": "cancer"},
                "numTraining": n_cases,
                "training": [
                    {"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
                    for i in range(n_cases)
                ],
                "test": [],
            },
        )
    return paths
