"""Losses on logits against hand-computed values and independent references (torch BCE, MONAI Dice)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hepaseg.errors import HepasegError
from hepaseg.training.losses import (
    DiceBCELoss,
    FocalLoss,
    TverskyLoss,
    build_loss,
    soft_dice_loss,
    tversky_loss,
)


def _pair(seed: int = 0, shape=(3, 1, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 2
    target = (torch.rand(shape, generator=g) > 0.7).float()
    return logits, target


def test_dice_of_perfect_prediction_is_zero():
    _, target = _pair()
    logits = (target * 2 - 1) * 30  # sigmoid = 1 on the mask, 0 elsewhere (to ~1e-13)
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert DiceBCELoss()(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_hand_computed():
    # p = sigmoid(0) = 0.5 everywhere on 4 pixels, 1 of them foreground:
    # 1 - (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.5)
    # smooth 0: 1 - 2 * 0.5 / 3
    assert soft_dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1 - 1 / 3)


def test_dice_matches_monai_batch_dice():
    from monai.losses import DiceLoss

    logits, target = _pair(1)
    ref = DiceLoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    assert soft_dice_loss(logits, target).item() == pytest.approx(ref.item(), rel=1e-5)


def test_dice_bce_is_dice_plus_torch_bce():
    logits, target = _pair(2)
    bce = F.binary_cross_entropy(torch.sigmoid(logits), target)  # the probability form, not the fused one
    loss = DiceBCELoss(dice_weight=0.0)(logits, target)
    assert loss.item() == pytest.approx(bce.item(), rel=1e-5)
    both = DiceBCELoss(dice_weight=2.0, bce_weight=0.5)(logits, target)
    assert both.item() == pytest.approx(2 * soft_dice_loss(logits, target).item() + 0.5 * bce.item(), rel=1e-5)


def test_focal_gamma_zero_is_bce_and_hand_value():
    logits, target = _pair(3)
    assert FocalLoss(gamma=0)(logits, target).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-6
    )
    # One pixel, logit 0 (p = 0.5), target 1: (1 - 0.5)^2 * log 2, times alpha 0.25.
    x, t = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    assert FocalLoss(gamma=2)(x, t).item() == pytest.approx(0.25 * math.log(2))
    assert FocalLoss(gamma=2, alpha=0.25)(x, t).item() == pytest.approx(0.25 * 0.25 * math.log(2))
    # Focusing: a confidently right pixel costs (much) less than under BCE.
    easy = torch.full((1, 1, 1, 1), 3.0)
    assert FocalLoss(gamma=2)(easy, t).item() < 0.01 * F.binary_cross_entropy_with_logits(easy, t).item()


def test_tversky_half_half_equals_dice_and_weights_misses():
    logits, target = _pair(4)
    assert TverskyLoss(alpha=0.5, beta=0.5, smooth=0)(logits, target).item() == pytest.approx(
        soft_dice_loss(logits, target, smooth=0).item(), rel=1e-6
    )
    # (TP + s) / (TP + (FP + FN) / 2 + s) = (2 TP + 2 s) / (2 TP + FP + FN + 2 s): Dice with smooth 2 s.
    assert TverskyLoss(alpha=0.5, beta=0.5, smooth=1)(logits, target).item() == pytest.approx(
        soft_dice_loss(logits, target, smooth=2).item(), rel=1e-6
    )
    # All-background prediction of a mask: only false negatives, so a larger beta costs more.
    none = torch.full((1, 1, 4, 4), -30.0)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    low = tversky_loss(none, mask, alpha=0.7, beta=0.3, smooth=0)
    high = tversky_loss(none, mask, alpha=0.3, beta=0.7, smooth=0)
    assert low.item() == pytest.approx(1.0) and high.item() == pytest.approx(1.0)  # TP = 0
    half = torch.full((1, 1, 4, 4), -30.0)
    half[..., :1, :2] = 30.0  # 2 of the 4 mask pixels found, no false positives
    # 1 - 2 / (2 + beta * 2)
    assert tversky_loss(half, mask, alpha=0.3, beta=0.7, smooth=0).item() == pytest.approx(1 - 2 / 3.4, rel=1e-5)


def test_losses_are_differentiable_and_autocast_safe():
    logits, target = _pair(5)
    for name in ("dice_bce", "focal", "tversky"):
        x = logits.clone().bfloat16().requires_grad_(True)
        loss = build_loss(name)(x, target)
        assert loss.dtype == torch.float32  # computed in float32 whatever the input dtype
        loss.backward()
        assert torch.isfinite(x.grad.float()).all()


def test_bad_input():
    with pytest.raises(HepasegError, match=r"--loss: unknown loss 'dice'.*dice_bce, focal, tversky"):
        build_loss("dice")
    with pytest.raises(ValueError, match="same shape"):
        soft_dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1)
