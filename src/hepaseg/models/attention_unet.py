"""Attention U-Net (Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018).

Defining module: an additive *attention gate* on every skip connection. The gating
signal ``g`` comes from the next-coarser decoder level; with ``x`` the encoder skip,

    alpha = sigmoid(psi(ReLU(W_g g + W_x x)))       # (N, 1, H, W), in (0, 1)
    skip' = alpha * x                                # broadcast over channels

and ``skip'`` replaces ``x`` in the concatenation. ``W_g``, ``W_x`` are 1 x 1
convolutions (+ BN) to ``F_int`` channels and ``psi`` a 1 x 1 convolution (+ BN) to one
channel, so the gate costs little and learns to suppress irrelevant regions of the skip.

What the paper leaves open / what we chose (following the widely used reference code,
LeeJunHyun/Image_Segmentation ``AttU_Net``, 34.9 M parameters at width 64):

* 2D, five levels with widths ``w, 2w, 4w, 8w, 16w`` and the U-Net double-conv units.
* ``F_int`` = half the skip's channels.
* Decoder upsampling: 2x nearest upsampling followed by a 3 x 3 ConvBNReLU that halves the
  channels (:class:`UpConv`), as in the reference code; the gating signal is this
  upsampled decoder feature, so the gate works at the skip's resolution.

Deviations from the paper: the paper computes the gate on a grid at the *coarser*
resolution (``W_x`` a strided convolution, the coefficients resampled up to the skip),
adds a 1 x 1 output convolution after the multiplication and uses deep supervision;
we use the single-resolution gate of the reference code above and one output head.
Convolutions followed by BatchNorm carry no bias (the BN shift makes it redundant), so
our count is a little below the reference's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hepaseg.models.base import SegmentationModel
from hepaseg.models.blocks import ConvBNReLU, DoubleConv, OutConv
from hepaseg.models.registry import register_model

__all__ = ["UpConv", "AttentionGate", "AttentionUNet", "attention_unet"]


class UpConv(nn.Sequential):
    """2x nearest upsampling then a 3 x 3 ConvBNReLU. ``(N, in, H, W) -> (N, out, 2H, 2W)``.

    The decoder upsampling of the Attention U-Net / R2U-Net reference code (instead of
    U-Net's transposed convolution).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), ConvBNReLU(in_channels, out_channels))


class AttentionGate(nn.Module):
    """Additive attention gate: ``(g (N, F_g, H, W), x (N, F_x, H, W)) -> alpha * x (N, F_x, H, W)``.

    ``self.psi`` outputs the attention coefficients ``alpha`` ``(N, 1, H, W)`` in (0, 1)
    (hook it to inspect them).
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int) -> None:
        super().__init__()
        # Bias-free 1x1 convs: the BN right after each supplies the shift.
        self.w_g = nn.Sequential(
            nn.Conv2d(gate_channels, inter_channels, 1, bias=False), nn.BatchNorm2d(inter_channels)
        )
        self.w_x = nn.Sequential(
            nn.Conv2d(skip_channels, inter_channels, 1, bias=False), nn.BatchNorm2d(inter_channels)
        )
        self.relu = nn.ReLU(inplace=True)
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, 1, bias=False), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        alpha = self.psi(self.relu(self.w_g(g) + self.w_x(x)))  # (N, 1, H, W)
        return x * alpha


class AttentionUNet(SegmentationModel):
    """U-Net whose skips pass through attention gates (five levels, four 2 x 2 poolings).

    Args:
        in_channels: input channels (default 1); must be >= 1.
        num_classes: output logit channels (default 1); must be >= 1.
        base_width: channels of the first level (default 64); levels use
            ``w, 2w, 4w, 8w, 16w``. Must be >= 2 (``F_int`` is half a width).

    Input ``(N, in_channels, H, W)`` of any ``H, W`` (padded to a multiple of 16);
    output raw logits ``(N, num_classes, H, W)``.

    Example::

        >>> net = AttentionUNet(base_width=8)
        >>> net(torch.zeros(2, 1, 64, 48)).shape
        torch.Size([2, 1, 64, 48])
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 1, base_width: int = 64) -> None:
        super().__init__()
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("num_classes", num_classes, 1),
            ("base_width", base_width, 2),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.in_channels, self.num_classes, self.size_multiple = in_channels, num_classes, 16
        widths = [base_width * 2**i for i in range(5)]  # w, 2w, 4w, 8w, 16w

        self.pool = nn.MaxPool2d(2)
        self.encoders = nn.ModuleList(
            DoubleConv(c_in, c_out) for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        # Decoder level i (coarse to fine) goes from widths[i+1] to widths[i].
        levels = range(3, -1, -1)
        self.ups = nn.ModuleList(UpConv(widths[i + 1], widths[i]) for i in levels)
        self.gates = nn.ModuleList(AttentionGate(widths[i], widths[i], widths[i] // 2) for i in levels)
        self.decoders = nn.ModuleList(DoubleConv(2 * widths[i], widths[i]) for i in levels)
        self.head = OutConv(widths[0], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else self.pool(x))
            skips.append(x)  # (N, w * 2**level, H / 2**level, W / 2**level)
        x = skips.pop()  # bottleneck, (N, 16w, H/16, W/16)
        for up, gate, decoder in zip(self.ups, self.gates, self.decoders):
            g = up(x)  # gating signal: the coarser decoder feature, upsampled to the skip's size
            x = decoder(torch.cat([gate(g, skips.pop()), g], dim=1))
        return self.head(x)


@register_model(
    paper="Oktay et al., MIDL 2018",
    module="additive attention gates (sigmoid coefficients from the coarser decoder level) on the skips",
)
def attention_unet(
    *, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, **options
) -> AttentionUNet:
    """Attention U-Net; no architecture options."""
    return AttentionUNet(in_channels=in_channels, num_classes=num_classes, base_width=base_width, **options)
