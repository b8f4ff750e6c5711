"""U-Net (Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015).

Defining module: a contracting path of double 3 x 3 convolutions and 2 x 2 max-pooling,
and an expanding path of 2 x 2 transposed convolutions whose output is concatenated
with the encoder feature of the same resolution (the *skip connection*).

What we chose where the paper differs or is silent:

* Five levels with widths ``w, 2w, 4w, 8w, 16w`` (``w = 64`` in the paper), four poolings.
* "Same" padding (the paper uses unpadded convolutions and crops the skips), so the
  output has the input's size; :class:`~hepaseg.models.base.SegmentationModel` pads
  ``H, W`` to a multiple of 16 and crops the logits back.
* BatchNorm after every convolution (not in the 2015 paper, standard since); the
  convolution before it has no bias. 31.0 M parameters at ``w = 64``, one input channel.
* One ``1 x 1`` head to ``num_classes`` raw logits (no softmax/sigmoid in ``forward``).

MFCNet (:mod:`hepaseg.models.mfcnet`) reuses this network and hooks into
:meth:`UNet.encode` / :meth:`UNet.decode`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hepaseg.models.base import SegmentationModel, check_positive
from hepaseg.models.blocks import DoubleConv, Down, OutConv, Up
from hepaseg.models.registry import register_model

__all__ = ["UNet", "unet"]

NUM_LEVELS = 5


class UNet(SegmentationModel):
    """Five-level U-Net with BatchNorm and transposed-convolution upsampling.

    Args:
        in_channels: input channels (default 1).
        num_classes: output logit channels (default 1).
        base_width: channels ``w`` of level 1 (default 64); level ``l`` has ``w * 2**(l-1)``.

    Input ``(N, in_channels, H, W)`` of any ``H, W`` (padded to a multiple of 16);
    output raw logits ``(N, num_classes, H, W)``.

    Example::

        >>> net = UNet(base_width=8)
        >>> net(torch.zeros(2, 1, 64, 48)).shape
        torch.Size([2, 1, 64, 48])
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 1, base_width: int = 64) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes, base_width=base_width)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.size_multiple = 2 ** (NUM_LEVELS - 1)
        self.widths = [base_width * 2**i for i in range(NUM_LEVELS)]  # w, 2w, 4w, 8w, 16w
        w = self.widths
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels, w[0])] + [Down(w[i - 1], w[i]) for i in range(1, NUM_LEVELS)]
        )
        # Decoder coarse to fine: level i+1 (in) + skip of level i -> level i.
        self.decoder = nn.ModuleList(Up(w[i + 1], w[i], w[i]) for i in range(NUM_LEVELS - 2, -1, -1))
        self.head = OutConv(w[0], num_classes)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of levels 1..5; level ``l`` is ``(N, w 2**(l-1), H / 2**(l-1), W / 2**(l-1))``."""
        features = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``(N, num_classes, H, W)`` from the five levels (the last one is the bottleneck)."""
        x = features[-1]
        for up, skip in zip(self.decoder, reversed(features[:-1])):
            x = up(x, skip)
        return self.head(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


@register_model(
    paper="Ronneberger et al., MICCAI 2015",
    module="encoder-decoder with skip connections (double 3x3 conv, max-pool, transposed-conv up)",
)
def unet(*, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, **options) -> UNet:
    """U-Net; no architecture options."""
    return UNet(in_channels=in_channels, num_classes=num_classes, base_width=base_width, **options)
