"""The LightningModule: a network, a loss, AdamW with warm-up + cosine/poly, val Dice.

The module receives the network and the loss (it builds neither, after
Lightning's ``backbone_image_classifier`` example) and stays a few lines per
step. Static facts needed to rebuild the network from a checkpoint alone
(model name and options, data options, resolved config) come in as the plain
dict ``meta`` and are written into ``checkpoint["hepaseg"]``.
"""

from __future__ import annotations

import functools
import math

import lightning as L
import torch
from torch import nn

from hepaseg import __version__
from hepaseg.errors import HepasegError

__all__ = ["SegmentationModule", "dice_per_slice", "lr_factor"]


def dice_per_slice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice of ``sigmoid(logits) > 0.5`` per slice; an empty prediction of an empty mask scores 1.

    Args:
        logits: ``(N, 1, H, W)`` raw scores.
        target: ``(N, 1, H, W)`` in {0, 1}.

    Returns ``(N,)`` float32 in [0, 1].
    """
    pred = logits > 0  # sigmoid(x) > 0.5 exactly when x > 0; avoids the sigmoid
    truth = target > 0.5
    inter = (pred & truth).flatten(1).sum(1).float()
    total = pred.flatten(1).sum(1).float() + truth.flatten(1).sum(1).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based).

    Linear warm-up from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps, then
    ``cosine`` (half cosine) or ``poly`` (``(1 - t) ** 0.9``) decay to ``min_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else (1 - t) ** 0.9
    return min_ratio + (1 - min_ratio) * decay


class SegmentationModule(L.LightningModule):
    """Train a binary segmentation network on logits ``(N, 1, H, W)``.

    Args:
        net: network mapping ``(N, C, H, W)`` to logits ``(N, 1, H, W)``.
        loss: callable ``loss(logits, target) -> scalar`` (see ``training.losses``).
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        schedule: ``"cosine"`` or ``"poly"`` (per step, see :func:`lr_factor`).
        warmup_fraction: share of all optimizer steps in linear warm-up.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        channels_last: run the network in NHWC memory format.
        compile: compile the network's forward with ``torch.compile`` (in place, so its
            parameters and state-dict keys stay those of ``net``).
        meta: plain dict (model, model_options, in_channels, num_classes,
            base_width, data_options, config) copied into ``checkpoint["hepaseg"]``.

    Logs ``train_loss`` (step and epoch), ``val_loss`` and ``val_dice`` (epoch;
    mean over validation slices of :func:`dice_per_slice`).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        schedule: str = "cosine",
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        # Only plain values land in the checkpoint, so it loads with weights_only=True.
        self.save_hyperparameters(ignore=["net", "loss"])
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        if compile:
            self.net.compile()  # nn.Module.compile: compiled lazily at the first call, in place
        self.loss = loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        image, mask = batch  # (N, C, H, W), (N, 1, H, W)
        loss = self.loss(self(image), mask)
        if not torch.isfinite(loss):
            raise HepasegError(
                f"training loss: not finite: expected a finite value, got {loss.item()} at step "
                f"{self.global_step} (epoch {self.current_epoch}, batch {batch_idx}). "
                "Lower --lr, try --precision 32, or check the prepared data for NaNs"
            )
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(image))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        image, mask = batch
        logits = self(image).float()
        n = len(image)
        # Weighted by batch size, so the epoch value is the mean over slices.
        self.log("val_loss", self.loss(logits, mask), batch_size=n, sync_dist=True)
        self.log("val_dice", dice_per_slice(logits, mask).mean(), prog_bar=True, batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_fraction * total)
        # A partial keeps the scheduler state plain (LambdaLR stores only its empty __dict__), so on
        # --resume the step count comes from the checkpoint but the shape from the current config
        # (a larger --max-epochs stretches the schedule instead of leaving lr at its final value).
        schedule = functools.partial(lr_factor, total_steps=total, warmup_steps=warmup, schedule=hp.schedule,
                                     min_ratio=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        metrics = self.trainer.callback_metrics
        val_dice = metrics.get("val_dice")
        checkpoint["hepaseg"] = {
            "version": __version__,
            **(self.hparams.meta or {}),
            "metrics": {
                "val_dice": float(val_dice) if val_dice is not None else None,
                "epoch": int(self.current_epoch),
                "step": int(self.global_step),
            },
        }
