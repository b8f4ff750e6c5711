"""Building blocks shared by several networks (U-Net family).

All blocks keep the spatial size unless they say otherwise; shapes are
``(N, C, H, W)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ConvBNReLU", "DoubleConv", "Down", "Up", "OutConv"]


class ConvBNReLU(nn.Sequential):
    """3 x 3 (by default) convolution -> BatchNorm -> ReLU; bias is dropped because BN follows."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        padding = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """The U-Net unit: two ConvBNReLU. ``(N, in, H, W) -> (N, out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        mid = mid_channels or out_channels
        super().__init__(ConvBNReLU(in_channels, mid), ConvBNReLU(mid, out_channels))


class Down(nn.Sequential):
    """2 x 2 max-pool then a unit (DoubleConv by default). ``(N, in, H, W) -> (N, out, H/2, W/2)``."""

    def __init__(self, in_channels: int, out_channels: int, unit: type[nn.Module] = DoubleConv) -> None:
        super().__init__(nn.MaxPool2d(2), unit(in_channels, out_channels))


class Up(nn.Module):
    """2 x 2 transposed-conv upsampling, concatenation with the skip, then a unit.

    ``up(N, in, H, W), skip(N, skip, 2H, 2W) -> (N, out, 2H, 2W)``; the transposed
    convolution halves the channels (to ``in // 2``) as in Ronneberger et al.
    """

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, unit: type[nn.Module] = DoubleConv
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = unit(in_channels // 2 + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Conv2d):
    """1 x 1 convolution to class logits."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes, kernel_size=1)
