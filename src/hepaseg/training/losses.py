"""Segmentation losses on raw logits ``(N, 1, H, W)`` against binary targets ``(N, 1, H, W)``.

All losses take logits (never probabilities) so that the sigmoid and the log
are fused where it matters (BCE, focal) and mixed precision stays stable; the
region terms (Dice, Tversky) are computed in float32 whatever the autocast dtype.

Region terms are *batch* terms: true/false positives are summed over the whole
batch before the ratio is taken (as in nnU-Net's "batch Dice"). Most CT slices
hold no tumour; a per-slice soft Dice on an empty slice is decided by the
smoothing constant alone, whereas the batch sum weights every pixel equally.

Names for :func:`build_loss` (and ``hepaseg train --loss``): ``dice_bce``
(default), ``focal``, ``tversky``, ``dice_topk`` (nnU-Net's ``DC_and_topk_loss``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hepaseg.errors import HepasegError

__all__ = [
    "LOSSES",
    "DiceBCELoss",
    "DiceTopKLoss",
    "FocalLoss",
    "TverskyLoss",
    "build_loss",
    "soft_dice_loss",
    "topk_bce",
    "tversky_loss",
]


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits and target must have the same shape, got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")


def tversky_loss(
    logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.5, beta: float = 0.5, smooth: float = 1.0
) -> torch.Tensor:
    """``1 - (TP + s) / (TP + alpha FP + beta FN + s)`` on ``p = sigmoid(logits)``, summed over the batch.

    Args:
        logits: ``(N, 1, H, W)`` raw scores.
        target: ``(N, 1, H, W)`` in {0, 1} (float).
        alpha: weight of false positives (soft: ``sum p (1 - t)``).
        beta: weight of false negatives (soft: ``sum (1 - p) t``).
        smooth: added to numerator and denominator (pixels); keeps empty batches at loss 0.

    Returns a scalar; ``alpha = beta = 0.5`` is the soft Dice loss (:func:`soft_dice_loss` with
    smoothing ``2 * smooth``).
    """
    _check(logits, target)
    p = torch.sigmoid(logits.float())
    t = target.float()
    tp = (p * t).sum()
    fp = (p * (1 - t)).sum()
    fn = ((1 - p) * t).sum()
    return 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum p + sum t + s)`` over the whole batch (``p = sigmoid(logits)``)."""
    _check(logits, target)
    p = torch.sigmoid(logits.float())
    t = target.float()
    return 1 - (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


class DiceBCELoss(nn.Module):
    """``dice_weight * soft Dice + bce_weight * BCE``: the default.

    BCE gives dense per-pixel gradients early in training; Dice counters the
    heavy background/tumour imbalance.

    Args:
        dice_weight: weight of the batch soft Dice loss (default 1).
        bce_weight: weight of the mean binary cross-entropy (default 1).
        smooth: Dice smoothing in pixels (default 1).
    """

    def __init__(self, *, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        self.dice_weight, self.bce_weight, self.smooth = dice_weight, bce_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return self.dice_weight * soft_dice_loss(logits, target, smooth=self.smooth) + self.bce_weight * bce


def topk_bce(logits: torch.Tensor, target: torch.Tensor, *, k: float = 10.0) -> torch.Tensor:
    """Mean binary cross-entropy of the ``k`` % hardest pixels of the whole batch (nnU-Net's ``TopKLoss``).

    Args:
        logits: ``(N, 1, H, W)`` raw scores.
        target: ``(N, 1, H, W)`` in {0, 1}.
        k: percentage of pixels kept, in (0, 100]; ``ceil(k / 100 * pixels)`` is kept
            (nnU-Net uses ``int(...)``, which can keep none on tiny inputs).

    Returns a scalar: the mean of the largest per-pixel BCE values.
    """
    _check(logits, target)
    if not 0 < k <= 100:
        raise ValueError(f"k: expected a percentage in (0, 100], got {k}")
    ce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").flatten()
    n = max(1, math.ceil(ce.numel() * k / 100))
    return ce.topk(n, sorted=False).values.mean()


class DiceTopKLoss(nn.Module):
    """``dice_weight * soft Dice + topk_weight * top-k BCE`` (nnU-Net's ``DC_and_topk_loss``, k = 10 %).

    The top-k term ignores the many easy background pixels and spends the
    cross-entropy gradient on the hardest ``k`` % (tumour borders, small lesions).

    Args:
        k: percentage of the batch's pixels in the cross-entropy term (default 10).
        dice_weight: weight of the batch soft Dice loss (default 1).
        topk_weight: weight of the top-k BCE (default 1).
        smooth: Dice smoothing in pixels (default 1).
    """

    def __init__(self, *, k: float = 10.0, dice_weight: float = 1.0, topk_weight: float = 1.0,
                 smooth: float = 1.0) -> None:
        super().__init__()
        if not 0 < k <= 100:
            raise ValueError(f"k: expected a percentage in (0, 100], got {k}")
        self.k, self.dice_weight, self.topk_weight, self.smooth = k, dice_weight, topk_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice = soft_dice_loss(logits, target, smooth=self.smooth)
        return self.dice_weight * dice + self.topk_weight * topk_bce(logits, target, k=self.k)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., ICCV 2017): ``mean(-a_t (1 - p_t)^gamma log p_t)``.

    Args:
        gamma: focusing exponent, >= 0 (default 2; 0 gives plain BCE).
        alpha: weight of the positive class in [0, 1], negatives get ``1 - alpha``;
            ``None`` (default) weights both classes 1.
    """

    def __init__(self, *, gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if alpha is not None and not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check(logits, target)
        x, t = logits.float(), target.float()
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")  # = -log p_t
        p_t = torch.exp(-ce)
        loss = (1 - p_t) ** self.gamma * ce if self.gamma else ce
        if self.alpha is not None:
            loss = (self.alpha * t + (1 - self.alpha) * (1 - t)) * loss
        return loss.mean()


class TverskyLoss(nn.Module):
    """Tversky loss (Salehi et al., MLMI 2017); see :func:`tversky_loss`.

    Args:
        alpha: false-positive weight (default 0.3).
        beta: false-negative weight (default 0.7: small tumours are missed more
            often than over-segmented, so misses cost more).
        smooth: smoothing in pixels (default 1).
    """

    def __init__(self, *, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1.0) -> None:
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.smooth = alpha, beta, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return tversky_loss(logits, target, alpha=self.alpha, beta=self.beta, smooth=self.smooth)


LOSSES: dict[str, type[nn.Module]] = {
    "dice_bce": DiceBCELoss,
    "focal": FocalLoss,
    "tversky": TverskyLoss,
    "dice_topk": DiceTopKLoss,
}


def build_loss(name: str, **options) -> nn.Module:
    """The loss called ``name`` (one of :data:`LOSSES`) built with keyword ``options``."""
    if name not in LOSSES:
        raise HepasegError(f"--loss: unknown loss {name!r}: expected one of {', '.join(LOSSES)}")
    return LOSSES[name](**options)
