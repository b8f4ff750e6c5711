"""SE U-Net: U-Net with squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation
Networks", CVPR 2018) — the paper's "SENet" row of Table 1.

Defining module: the *squeeze-and-excitation* (SE) block. It squeezes each channel to
one number by global average pooling, passes the ``C``-vector through a bottleneck
(FC ``C -> C/r``, ReLU, FC ``C/r -> C``, sigmoid) and rescales every channel by its gate::

    s = sigmoid(W_2 ReLU(W_1 avgpool(x)))    # (N, C, 1, 1), in (0, 1)
    y = s * x

What the paper(s) leave open / what we chose: Hu et al. define SE for classification
backbones and the MFCNet paper does not say how SENet was used for segmentation. We use
the U-Net (five levels, widths ``w, 2w, 4w, 8w, 16w``, transposed-conv upsampling from
:mod:`hepaseg.models.blocks`) with one SE block after every double convolution of the
encoder and the decoder, reduction ``r = 16`` (Hu et al.'s default; option
``reduction``). The FC layers are 1 x 1 convolutions with bias on the pooled
``(N, C, 1, 1)`` map (identical maths, no reshapes).

Deviation: the bottleneck keeps at least 8 channels, ``max(8, C // r)`` (timm's
``SEModule`` has the same floor). With ``r = 16`` a narrow level would otherwise get one
or two hidden units, and a single dead ReLU there freezes the whole gate (no gradient to
its weights). At the default width 64 this only affects the 64-channel level (8 hidden
units instead of 4).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from hepaseg.models.base import SegmentationModel, check_positive
from hepaseg.models.blocks import DoubleConv, Down, OutConv, Up
from hepaseg.models.registry import register_model

__all__ = ["SqueezeExcitation", "SEDoubleConv", "SEUNet", "se_unet"]

_MIN_HIDDEN = 8  # floor of the SE bottleneck width (see the module docstring)


class SqueezeExcitation(nn.Module):
    """SE block. ``(N, C, H, W) -> (N, C, H, W)``.

    ``self.excite`` outputs the channel gates ``(N, C, 1, 1)`` in (0, 1) (hook it to inspect them).
    """

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(_MIN_HIDDEN, channels // reduction)
        self.squeeze = nn.AdaptiveAvgPool2d(1)  # (N, C, 1, 1): per-channel mean
        self.excite = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excite(self.squeeze(x))


class SEDoubleConv(nn.Sequential):
    """U-Net double conv followed by an SE block. ``(N, in, H, W) -> (N, out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, *, reduction: int = 16) -> None:
        super().__init__(
            DoubleConv(in_channels, out_channels), SqueezeExcitation(out_channels, reduction=reduction)
        )


class SEUNet(SegmentationModel):
    """U-Net with an SE block after every double conv (five levels, four 2 x 2 poolings).

    Args:
        in_channels: input channels (default 1); must be >= 1.
        num_classes: output logit channels (default 1); must be >= 1.
        base_width: channels of the first level (default 64); levels use
            ``w, 2w, 4w, 8w, 16w``; must be >= 1.
        reduction: SE bottleneck ratio ``r`` (default 16); must be >= 1.

    Input ``(N, in_channels, H, W)`` of any ``H, W`` (padded to a multiple of 16);
    output raw logits ``(N, num_classes, H, W)``.

    Example::

        >>> net = SEUNet(base_width=8, reduction=4)
        >>> net(torch.zeros(2, 1, 64, 48)).shape
        torch.Size([2, 1, 64, 48])
    """

    def __init__(
        self, *, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, reduction: int = 16
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes, base_width=base_width, reduction=reduction)
        self.in_channels, self.num_classes, self.size_multiple = in_channels, num_classes, 16
        self.reduction = reduction
        widths = [base_width * 2**i for i in range(5)]  # w, 2w, 4w, 8w, 16w
        unit = partial(SEDoubleConv, reduction=reduction)

        self.stem = unit(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], unit=unit) for i in range(4))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], widths[i], unit=unit) for i in range(3, -1, -1))
        self.head = OutConv(widths[0], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]  # (N, w, H, W)
        for down in self.downs:
            skips.append(down(skips[-1]))  # (N, w * 2**level, H / 2**level, W / 2**level)
        x = skips.pop()  # bottleneck, (N, 16w, H/16, W/16)
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


@register_model(
    paper="Hu et al., CVPR 2018",
    module="squeeze-and-excitation channel gates (reduction 16) after every U-Net double conv",
)
def se_unet(*, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, **options) -> SEUNet:
    """SE U-Net; options: ``reduction`` (SE ratio, default 16)."""
    return SEUNet(in_channels=in_channels, num_classes=num_classes, base_width=base_width, **options)
