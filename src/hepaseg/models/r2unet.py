"""R2U-Net (Alom et al., "Recurrent Residual Convolutional Neural Network based on U-Net
(R2U-Net) for Medical Image Segmentation", arXiv:1802.06955, 2018).

Defining module: the *recurrent residual convolutional unit* (RRCNN), which replaces
every U-Net double convolution. A 1 x 1 convolution first maps the input to the unit's
width; two recurrent convolutional layers (RCL) follow, and their output is added to
the 1 x 1 output (the residual). An RCL with ``t`` time steps applies one shared
3 x 3 ConvBNReLU ``t + 1`` times, feeding the input back in at every step::

    h_0 = f(x);   h_k = f(x + h_{k-1}),  k = 1..t;   RCL(x) = h_t

so it gains depth (receptive field) without gaining parameters.

What the paper leaves open / what we chose (following the reference code,
LeeJunHyun/Image_Segmentation ``R2U_Net``, 39.1 M parameters at width 64):

* ``t = 2`` (the paper's setting; option ``t``), two RCLs per unit.
* Five levels with widths ``w, 2w, 4w, 8w, 16w``; 2 x 2 max-pooling down; decoder
  upsampling by 2x nearest upsampling + 3 x 3 ConvBNReLU halving the channels
  (:class:`~hepaseg.models.attention_unet.UpConv`).

Deviations: the paper's RCL equation has separate feed-forward and recurrent kernels
(``w_f * x + w_r * h``); the reference code, and we, use one shared convolution on
``x + h`` (fewer parameters, same unrolled depth). Convolutions followed by BatchNorm
carry no bias. In training mode the shared BatchNorm sees ``t + 1`` batches per step,
so its running statistics average over the unrolled steps (as in the reference code).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hepaseg.models.attention_unet import UpConv
from hepaseg.models.base import SegmentationModel, check_positive
from hepaseg.models.blocks import ConvBNReLU, OutConv
from hepaseg.models.registry import register_model

__all__ = ["RecurrentConv", "RRCNNBlock", "R2UNet", "r2unet"]


class RecurrentConv(nn.Module):
    """Recurrent convolutional layer: one shared ConvBNReLU applied ``t + 1`` times.

    ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(self, channels: int, *, t: int) -> None:
        super().__init__()
        self.t = t
        self.conv = ConvBNReLU(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        for _ in range(self.t):
            h = self.conv(x + h)  # the input re-enters at every time step
        return h


class RRCNNBlock(nn.Module):
    """Recurrent residual unit: 1 x 1 conv, two RCLs, residual add. ``(N, in, H, W) -> (N, out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, *, t: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(
            in_channels, out_channels, kernel_size=1
        )  # matches channels for the residual
        self.rcnn = nn.Sequential(RecurrentConv(out_channels, t=t), RecurrentConv(out_channels, t=t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        return x + self.rcnn(x)


class R2UNet(SegmentationModel):
    """U-Net with recurrent residual units (five levels, four 2 x 2 poolings).

    Args:
        in_channels: input channels (default 1); must be >= 1.
        num_classes: output logit channels (default 1); must be >= 1.
        base_width: channels of the first level (default 64); levels use
            ``w, 2w, 4w, 8w, 16w``; must be >= 1.
        t: recurrent time steps of each RCL (default 2); must be >= 1. Each RCL applies
            its shared convolution ``t + 1`` times.

    Input ``(N, in_channels, H, W)`` of any ``H, W`` (padded to a multiple of 16);
    output raw logits ``(N, num_classes, H, W)``.

    Example::

        >>> net = R2UNet(base_width=8, t=2)
        >>> net(torch.zeros(2, 1, 64, 48)).shape
        torch.Size([2, 1, 64, 48])
    """

    def __init__(
        self, *, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, t: int = 2
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes, base_width=base_width, t=t)
        self.in_channels, self.num_classes, self.size_multiple = in_channels, num_classes, 16
        self.t = t
        widths = [base_width * 2**i for i in range(5)]  # w, 2w, 4w, 8w, 16w

        self.pool = nn.MaxPool2d(2)
        self.encoders = nn.ModuleList(
            RRCNNBlock(c_in, c_out, t=t) for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        # Decoder level i (coarse to fine) goes from widths[i+1] to widths[i].
        levels = range(3, -1, -1)
        self.ups = nn.ModuleList(UpConv(widths[i + 1], widths[i]) for i in levels)
        self.decoders = nn.ModuleList(RRCNNBlock(2 * widths[i], widths[i], t=t) for i in levels)
        self.head = OutConv(widths[0], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else self.pool(x))
            skips.append(x)  # (N, w * 2**level, H / 2**level, W / 2**level)
        x = skips.pop()  # bottleneck, (N, 16w, H/16, W/16)
        for up, decoder in zip(self.ups, self.decoders):
            x = decoder(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


@register_model(
    paper="Alom et al., arXiv 2018",
    module="recurrent residual conv units (shared 3x3 conv unrolled t=2 steps, 1x1 residual) as U-Net units",
)
def r2unet(*, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, **options) -> R2UNet:
    """R2U-Net; options: ``t`` (recurrent steps, default 2)."""
    return R2UNet(in_channels=in_channels, num_classes=num_classes, base_width=base_width, **options)
