"""A torch Dataset over one split of a prepared slice dataset (see :mod:`hepaseg.data.prepare`).

Each item is one axial slice ``(image, mask)``: image float32 ``(C, H, W)`` in
[0, 1] with ``C = 2K + 1`` context channels, mask float32 ``(1, H, W)`` in {0, 1}.
Shards are small (a few MB per case), so each case's shard is read once, on
first use, and kept in memory; DataLoader workers each load what they touch.

Training-time options, applied in this order to the raw shard item (label
{0, 1, 2}): synthetic tumours (:class:`hepaseg.data.synthetic.SyntheticTumors`,
``synthetic_tumors`` = probability per item, ``synthetic_families`` = which lesion
families; painted pixels become tumour), then the liver-enhancement shift
(:class:`hepaseg.data.augment.LiverEnhancement`, ``liver_enhancement`` =
probability per item), then a crop (``crop`` pixels square; with probability ``tumor_crop_fraction``
centred on a random pixel of the target (tumour) mask, zero-padded where the
window leaves the slice, so that pixel is exactly the crop's centre pixel
``(crop // 2, crop // 2)``; otherwise a uniformly placed crop inside the slice;
slices without target pixels always get the uniform crop), then the MONAI
augmentation (``augment``: a preset of :mod:`hepaseg.data.augment` -- ``True``
is ``"basic"``: flips p 0.5 per axis, affine p 0.5 with rotation +-15 degrees
and scaling 0.85-1.15, intensity shift +-0.1 p 0.5 -- ``"nnunet"`` or
``False``/``"none"``; ``aug_off`` removes families). Randomness is per item:
before each item the transforms are re-seeded (MONAI ``set_random_state``) and
the synthetic-tumour / crop generators are created from ``(seed, epoch,
index)``, so the same seed, epoch and index always give the same sample,
whatever the DataLoader worker or access order. Call
:meth:`SliceDataset.set_epoch` at the start of every epoch (as with
``DistributedSampler``) to draw new augmentations each epoch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hepaseg.data.augment import LIVER_ENHANCEMENT_HU, LiverEnhancement, build_augmentation, normalize_augment
from hepaseg.data.prepare import SPLITS, read_manifest
from hepaseg.data.synthetic import PAPER_DARKENING_HU, SyntheticTumors
from hepaseg.errors import HepasegError

__all__ = ["TARGETS", "SliceDataset", "build_augmentation"]

TARGETS = ("tumor", "liver")


class SliceDataset(Dataset):
    """Slices of one split of a prepared dataset.

    Args:
        root: directory written by :func:`hepaseg.data.prepare` (holds ``manifest.json``).
        split: ``"train"`` (default), ``"val"`` or ``"test"``.
        augment: MONAI augmentation preset (training only): ``False``/``"none"`` (default),
            ``True``/``"basic"`` or ``"nnunet"`` (see :mod:`hepaseg.data.augment`).
        target: ``"tumor"`` (default; mask = label == 2) or ``"liver"`` (mask = label > 0).
        seed: seed of the augmentation (default 0).
        aug_off: augmentation families to leave out (``"noise"``, ``"mirror"``, ...).
        synthetic_tumors: probability per item of painting synthetic tumours (default 0).
        synthetic_contrast_hu: ``(lo, hi)`` darkening range of the synthetic tumours, HU
            (default the paper's (65, 145); :func:`hepaseg.data.synthetic.synthetic_calibration`
            measures one from the data).
        synthetic_families: lesion families of the synthetic tumours (default ``("hypo",)``; see
            :data:`hepaseg.data.synthetic.FAMILIES`).
        liver_enhancement: probability per item of shifting the liver's enhancement (default 0).
        liver_enhancement_hu: ``(lo, hi)`` HU range of that shift (default (-60, 20)).
        crop: training crop size in pixels at the prepared resolution (default None: whole slice).
        tumor_crop_fraction: share of crops centred on a target pixel, in [0, 1] (needs ``crop``).

    Attributes:
        manifest: the parsed ``manifest.json``.
        options: ``manifest["options"]`` (window, size, slices, context_slices, ...).
        in_channels: ``2 * context_slices + 1``.
        case_ids: ids of the cases in this split that have at least one slice, manifest order.
        slice_keys: ``[(case_id, z), ...]`` one per item; ``z`` is the original slice index.

    Item ``i`` is ``(image, mask)``: image float32 ``(C, H, W)``, mask float32 ``(1, H, W)``.

    Example::

        ds = SliceDataset("prepared", "train", augment=True, seed=0)
        image, mask = ds[0]      # (ds.in_channels, 224, 224), (1, 224, 224)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        augment: bool | str = False,
        target: str = "tumor",
        seed: int = 0,
        aug_off: Sequence[str] = (),
        synthetic_tumors: float = 0.0,
        synthetic_contrast_hu: Sequence[float] = PAPER_DARKENING_HU,
        synthetic_families: Sequence[str] = ("hypo",),
        liver_enhancement: float = 0.0,
        liver_enhancement_hu: Sequence[float] = LIVER_ENHANCEMENT_HU,
        crop: int | None = None,
        tumor_crop_fraction: float = 0.0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
        self.root = Path(root)
        self.split = split
        self.target = target
        self.seed = int(seed)
        self.epoch = 0
        self.manifest: dict[str, Any] = read_manifest(self.root)
        self.options: dict[str, Any] = self.manifest["options"]
        self.in_channels = 2 * int(self.options["context_slices"]) + 1

        self._shards: dict[str, Path] = {}
        self.slice_keys: list[tuple[str, int]] = []
        self._rows: list[tuple[str, int]] = []  # (case_id, row in that case's shard)
        for case in self.manifest["cases"]:
            if case.get("split") != split or not case.get("n_slices"):
                continue
            shard = self.root / case["shard"]
            if not shard.is_file():
                raise HepasegError(
                    f"{shard}: shard of case {case['id']!r} is missing: expected the file named in "
                    f"{self.root / 'manifest.json'}. Re-run `hepaseg prepare`."
                )
            self._shards[case["id"]] = shard
            for row, z in enumerate(case["kept_slices"]):
                self.slice_keys.append((case["id"], int(z)))
                self._rows.append((case["id"], row))
        if not self.slice_keys:
            counts = {
                s: sum(c["n_slices"] for c in self.manifest["cases"] if c.get("split") == s) for s in SPLITS
            }
            raise HepasegError(
                f"{self.root}: split {split!r} has no slices: expected at least one "
                f"(slices per split: {counts}). Prepare more cases or change --split / --split-file."
            )
        self.case_ids = list(self._shards)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.augment = normalize_augment(augment)
        self._augment = build_augmentation(self.augment, off=aug_off, window=self.options["window"])

        size = int(self.options["size"])
        if crop is not None and not (isinstance(crop, int) and 0 < crop <= size):
            raise ValueError(f"crop: expected an integer in [1, {size}] (the prepared size) or None, got {crop!r}")
        if not 0.0 <= float(tumor_crop_fraction) <= 1.0:
            raise ValueError(f"tumor_crop_fraction: expected a fraction in [0, 1], got {tumor_crop_fraction!r}")
        if tumor_crop_fraction and crop is None:
            raise ValueError("tumor_crop_fraction: needs crop (a crop size in pixels), got crop=None")
        self.crop, self.tumor_crop_fraction = crop, float(tumor_crop_fraction)
        self._synthetic = None
        if synthetic_tumors:
            self._synthetic = SyntheticTumors(
                float(synthetic_tumors), window=self.options["window"], contrast_hu=synthetic_contrast_hu,
                families=synthetic_families,
            )
        self._enhancement = None
        if liver_enhancement:
            self._enhancement = LiverEnhancement(
                float(liver_enhancement), window=self.options["window"], shift_hu=liver_enhancement_hu
            )
        if self._synthetic is not None or self._enhancement is not None:
            # Pixel size at the prepared resolution: original spacing * original size / prepared size.
            self._geometry = {
                c["id"]: (
                    (c["spacing"][1] * c["shape"][1] / size, c["spacing"][2] * c["shape"][2] / size),
                    float(c["spacing"][0]),
                )
                for c in self.manifest["cases"]
                if c["id"] in self._shards
            }

    def __len__(self) -> int:
        return len(self.slice_keys)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw for this epoch (no effect without ``augment``)."""
        self.epoch = int(epoch)

    def _load(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        if case_id not in self._cache:
            path = self._shards[case_id]
            try:
                with np.load(path) as npz:
                    image, label = npz["image"], npz["label"]
            except (OSError, ValueError, KeyError) as exc:
                raise HepasegError(
                    f"{path}: cannot read shard ({type(exc).__name__}: {exc}): expected an .npz with image "
                    "and label arrays. Re-run `hepaseg prepare`."
                ) from None
            self._cache[case_id] = (image, label)
        return self._cache[case_id]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        case_id, row = self._rows[index]
        images, labels = self._load(case_id)
        image_np = images[row].astype(np.float32)  # (C, H, W), a copy
        label = labels[row]
        if self._synthetic is not None:
            pixel_mm, slice_mm = self._geometry[case_id]
            rng = np.random.default_rng([self.seed, self.epoch, index, 1])
            image_np, label = self._synthetic(image_np, label, rng, pixel_mm=pixel_mm, slice_mm=slice_mm)
        if self._enhancement is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index, 3])
            image_np, _ = self._enhancement(image_np, label, rng, pixel_mm=self._geometry[case_id][0])
        hit = label == 2 if self.target == "tumor" else label > 0
        if self.crop is not None:
            image_np, hit = self._cropped(image_np, hit, np.random.default_rng([self.seed, self.epoch, index, 2]))
        image = torch.from_numpy(np.ascontiguousarray(image_np))
        mask = torch.from_numpy(hit.astype(np.float32))[None]  # (1, H, W)
        if self._augment is not None:
            image, mask = self._augmented(image, mask, index)
        return image, mask

    def _cropped(self, image: np.ndarray, hit: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A ``crop x crop`` window: centred on a random target pixel (p = tumor_crop_fraction) or uniform."""
        n, (h, w) = self.crop, hit.shape
        centred = rng.random() < self.tumor_crop_fraction
        if centred and hit.any():
            ys, xs = np.nonzero(hit)
            pick = int(rng.integers(len(ys)))
            top, left = int(ys[pick]) - n // 2, int(xs[pick]) - n // 2
            # Zero-pad (0 = the window's lower end, background) so the picked pixel is the exact centre.
            pad = max(0, -top, -left, top + n - h, left + n - w)
            if pad:
                image = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
                hit = np.pad(hit, pad)
                top, left = top + pad, left + pad
        else:
            top, left = int(rng.integers(h - n + 1)), int(rng.integers(w - n + 1))
        return image[:, top : top + n, left : left + n], hit[top : top + n, left : left + n]

    def _augmented(
        self, image: torch.Tensor, mask: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # One independent seed per transform: seeding them all alike would correlate the
        # two flips (both or neither would happen).
        seeds = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(
            len(self._augment.transforms)
        )
        for transform, s in zip(self._augment.transforms, seeds):
            transform.set_random_state(seed=int(s))
        out = self._augment({"image": image, "mask": mask})
        image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().contiguous()
        mask = torch.as_tensor(out["mask"]).as_subclass(torch.Tensor).float().contiguous()
        return image, (mask > 0.5).float()
