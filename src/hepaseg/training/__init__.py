"""Training: losses, the LightningModule and DataModule, checkpoints, and ``train(config)``.

``hepaseg train`` fills a :class:`TrainConfig` and calls :func:`train`;
``evaluation`` and ``inference`` rebuild networks with :func:`load_checkpoint`.
"""

from hepaseg.training.checkpoint import LoadedModel, load_checkpoint, read_checkpoint
from hepaseg.training.config import TrainConfig, parse_key_values
from hepaseg.training.datamodule import SliceDataModule
from hepaseg.training.losses import DiceBCELoss, FocalLoss, TverskyLoss, build_loss
from hepaseg.training.module import SegmentationModule, dice_per_slice
from hepaseg.training.train import TrainResult, train

__all__ = [
    "DiceBCELoss",
    "FocalLoss",
    "LoadedModel",
    "SegmentationModule",
    "SliceDataModule",
    "TrainConfig",
    "TrainResult",
    "TverskyLoss",
    "build_loss",
    "dice_per_slice",
    "load_checkpoint",
    "parse_key_values",
    "read_checkpoint",
    "train",
]
