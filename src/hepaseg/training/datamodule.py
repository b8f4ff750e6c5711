"""The LightningDataModule: train/val :class:`hepaseg.data.SliceDataset` of a prepared directory.

Splits come from the prepared manifest (decided once, at ``hepaseg prepare``);
the training order is shuffled from ``seed`` so runs repeat. Under DDP Lightning
swaps in a ``DistributedSampler`` (seeded by ``seed_everything``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from hepaseg.data import SliceDataset, read_manifest
from hepaseg.errors import HepasegError

__all__ = ["DatasetEpoch", "SliceDataModule"]

class SliceDataModule(L.LightningDataModule):
    """Train and validation loaders over a prepared slice dataset.

    Args:
        root: prepared directory (``manifest.json`` + ``cases/*.npz``).
        batch_size: slices per batch and device.
        num_workers: DataLoader worker processes (0 = load in the main process).
        augment: training augmentation of the dataset (validation never augments).
        target: label turned into the binary mask: ``"tumor"`` or ``"liver"``; ``None`` (default)
            takes the dataset's prepared target (manifest ``options.target``, ``"tumor"`` when absent),
            so a dataset prepared with ``--target liver`` trains a liver stage.
        seed: seeds the shuffling order and the augmentation.

    Attributes (after :meth:`setup`): ``train_set``, ``val_set``, ``in_channels``
    (``2K + 1`` with ``K`` context slices) and ``data_options`` (plain dict stored
    in checkpoints: window, size, context_slices, slices, target, and roi + roi_margin_mm for
    liver-cropped datasets).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        batch_size: int = 8,
        num_workers: int = 0,
        augment: bool | str = True,
        target: str | None = None,
        seed: int = 0,
        train_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.train_options = dict(train_options or {})
        self.root = Path(root)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.augment, self.target, self.seed = augment, target, seed
        self.manifest = read_manifest(self.root)
        if target is None:
            self.target = self.manifest.get("options", {}).get("target") or "tumor"
        for split in ("train", "val"):
            if not any(c.get("split") == split for c in self.manifest.get("cases", [])):
                raise HepasegError(
                    f"{self.root / 'manifest.json'}: no {split!r} cases: expected at least one case in the "
                    f"train and the val split. Prepare more cases, or use `hepaseg prepare --z-split` to hold "
                    "out a block of slices of one case for validation"
                )
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # train() sets up early to learn in_channels
            return
        self.train_set = SliceDataset(
            self.root, "train", augment=self.augment, target=self.target, seed=self.seed, **self.train_options
        )
        self.val_set = SliceDataset(self.root, "val", augment=False, target=self.target, seed=self.seed)

    @property
    def in_channels(self) -> int:
        return int(self.train_set.in_channels)

    @property
    def data_options(self) -> dict[str, Any]:
        options = dict(self.manifest.get("options", {}))
        keep = ("window", "size", "context_slices", "slices")
        data_options = {**{k: options.get(k) for k in keep}, "target": self.target}
        # The in-plane orientation the slices were cut in (absent from datasets prepared before
        # hepaseg sliced every source in one canonical orientation).
        data_options["orientation"] = self.manifest.get("orientation")
        if options.get("roi") is not None:
            # The tumour stage of a cascade must see, at inference, the liver crop it was trained on
            # (hepaseg.inference.cascade). Absent for whole-slice datasets, as in older checkpoints.
            data_options.update(roi=options["roi"], roi_margin_mm=options.get("roi_margin_mm"))
        return data_options

    def train_dataloader(self) -> DataLoader:
        # drop_last avoids a last batch of one slice (BatchNorm cannot train on one value per channel
        # at the bottleneck); only when there is more than one batch.
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.train_set) > self.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, **self._loader_options())

    def _loader_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            # Not persistent: workers must pick up SliceDataset.set_epoch (a new augmentation draw per
            # epoch) from a fresh copy of the dataset; shards are small to re-read.
            "persistent_workers": False,
            "pin_memory": torch.cuda.is_available(),
        }


class DatasetEpoch(Callback):
    """Tell the training set the epoch before each epoch's loader iterator (and its workers) starts,
    so augmentation draws differ between epochs but repeat between runs (and after ``--resume``)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dataset = trainer.datamodule.train_set if trainer.datamodule is not None else None
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(trainer.current_epoch)
