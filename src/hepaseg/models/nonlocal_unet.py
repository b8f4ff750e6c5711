"""Non-local U-Net: U-Net with a non-local block (Wang et al., "Non-local Neural
Networks", CVPR 2018) — the paper's "Self-attention" row of Table 1.

Defining module: the *embedded-Gaussian non-local block*. Every position ``i`` of a
``(N, C, H, W)`` map gathers all positions ``j`` weighted by a softmax of embedded
dot products, and the result is added back through a zero-initialised projection::

    theta, phi, g = 1x1 convs C -> C/2
    y_i = sum_j softmax_j(theta_i . phi_j) g_j      # no 1/sqrt(d) scale (Wang et al. eq. 3)
    z   = BN(W_z y) + x                              # W_z: 1x1 conv C/2 -> C

With the BN's weight and bias initialised to zero the block starts as the identity
(Wang et al. Sec. 4.1), so inserting it does not disturb the U-Net at the start.
The attention is computed with ``scaled_dot_product_attention(scale=1.0)``: the same
softmax(theta^T phi) g, without materialising the ``HW x HW`` map.

What is left open / what we chose: the MFCNet paper names the row "Self-attention"
without details. We use the U-Net (five levels, widths ``w .. 16w``, DoubleConv and
transposed-conv upsampling from :mod:`hepaseg.models.blocks`) with one non-local block
on the bottleneck output ``(N, 16w, H/16, W/16)`` (1,024 positions for a 512 x 512
slice, so no sub-sampling of phi/g is needed; Wang et al.'s max-pool trick is left
out). theta/phi/g/W_z carry biases as in Wang et al.'s code. ``size_multiple = 16``.

Note: because the block is the identity at initialisation, the gradients of
theta/phi/g and of W_z's convolution are exactly zero on the first step (only the
BN's weight receives gradient); they become non-zero once that weight moves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hepaseg.models.base import SegmentationModel, check_positive
from hepaseg.models.blocks import DoubleConv, Down, OutConv, Up
from hepaseg.models.registry import register_model

__all__ = ["NonLocalBlock", "NonLocalUNet", "nonlocal_unet"]


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block with residual. ``(N, C, H, W) -> (N, C, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inter = max(1, channels // 2)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.out = nn.Sequential(nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels))
        # Zero BN affine -> z = x at initialisation (Wang et al. Sec. 4.1).
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """``y = softmax(theta^T phi) g`` before ``W_z``: ``(N, C, H, W) -> (N, C/2, H, W)``."""
        n, _, h, w = x.shape
        # (N, C/2, H, W) -> (N, 1, HW, C/2): one "head", positions as the sequence axis.
        q, k, v = (conv(x).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.theta, self.phi, self.g))
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (N, 1, HW, C/2)
        return y.squeeze(1).transpose(1, 2).reshape(n, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.attend(x))


class NonLocalUNet(SegmentationModel):
    """U-Net with an embedded-Gaussian non-local block on the bottleneck.

    Args:
        in_channels: input channels (default 1).
        num_classes: output channels (default 1).
        base_width: first-level width ``w``; levels ``w, 2w, 4w, 8w, 16w`` (default 64).

    Input ``(N, in_channels, H, W)``; output logits ``(N, num_classes, H, W)``.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 1, base_width: int = 64) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes, base_width=base_width)
        self.in_channels, self.num_classes, self.size_multiple = in_channels, num_classes, 16
        widths = [base_width * 2**i for i in range(5)]  # w, 2w, 4w, 8w, 16w

        self.stem = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(4))
        self.non_local = NonLocalBlock(widths[4])
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], widths[i]) for i in range(3, -1, -1))
        self.head = OutConv(widths[0], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]  # (N, w, H, W)
        for down in self.downs:
            skips.append(down(skips[-1]))  # (N, w * 2**level, H / 2**level, W / 2**level)
        x = self.non_local(skips.pop())  # bottleneck, (N, 16w, H/16, W/16)
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


@register_model(
    paper="Wang et al., CVPR 2018",
    module="U-Net with an embedded-Gaussian non-local (self-attention) block on the bottleneck",
)
def nonlocal_unet(
    *, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, **options
) -> NonLocalUNet:
    """Non-local U-Net; no architecture options."""
    return NonLocalUNet(in_channels=in_channels, num_classes=num_classes, base_width=base_width, **options)
