"""A torch Dataset over one split of a prepared slice dataset (see :mod:`hepaseg.data.prepare`).

Each item is one axial slice ``(image, mask)``: image float32 ``(C, H, W)`` in
[0, 1] with ``C = 2K + 1`` context channels, mask float32 ``(1, H, W)`` in {0, 1}.
Shards are small (a few MB per case), so each case's shard is read once, on
first use, and kept in memory; DataLoader workers each load what they touch.

Augmentation (``augment=True``, training only) uses MONAI dictionary transforms
applied jointly to image and mask: random flips along each in-plane axis
(p = 0.5 each), a random affine (p = 0.5) with rotation in +-15 degrees and
scaling by 0.85-1.15 along each axis (image bilinear, mask nearest so it stays
binary, zero padding = the lower end of the HU window), and a random intensity
shift in +-0.1 (p = 0.5, image only). Randomness is per item: before each item
the transforms are re-seeded (MONAI ``set_random_state``) from
``(seed, epoch, index)``, so the same seed, epoch and index always give the same
augmented sample, whatever the DataLoader worker or access order. Call
:meth:`SliceDataset.set_epoch` at the start of every epoch (as with
``DistributedSampler``) to draw new augmentations each epoch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hepaseg.data.prepare import SPLITS, read_manifest
from hepaseg.errors import HepasegError

__all__ = ["TARGETS", "SliceDataset", "build_augmentation"]

TARGETS = ("tumor", "liver")


def build_augmentation():
    """The MONAI training augmentation on ``{"image": (C, H, W), "mask": (1, H, W)}``."""
    from monai.transforms import Compose, RandAffined, RandFlipd, RandShiftIntensityd

    keys = ("image", "mask")
    return Compose(
        [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandAffined(
                keys=keys,
                prob=0.5,
                rotate_range=(math.radians(15.0),),
                scale_range=(0.15, 0.15),  # MONAI scales by 1 + U(-0.15, 0.15) per axis
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandShiftIntensityd(keys=("image",), prob=0.5, offsets=0.1),
        ]
    )


class SliceDataset(Dataset):
    """Slices of one split of a prepared dataset.

    Args:
        root: directory written by :func:`hepaseg.data.prepare` (holds ``manifest.json``).
        split: ``"train"`` (default), ``"val"`` or ``"test"``.
        augment: apply the random MONAI augmentation (for training only; default False).
        target: ``"tumor"`` (default; mask = label == 2) or ``"liver"`` (mask = label > 0).
        seed: seed of the augmentation (default 0).

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
        augment: bool = False,
        target: str = "tumor",
        seed: int = 0,
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
        self._augment = build_augmentation() if augment else None

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
        image = torch.from_numpy(images[row].astype(np.float32))  # (C, H, W)
        label = labels[row]
        hit = label == 2 if self.target == "tumor" else label > 0
        mask = torch.from_numpy(hit.astype(np.float32))[None]  # (1, H, W)
        if self._augment is not None:
            image, mask = self._augmented(image, mask, index)
        return image, mask

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
