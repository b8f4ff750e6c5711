"""DANet (Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019) —
the paper's "DANet" row of Table 1.

Defining module: the *dual attention head* on a dilated (output stride 8) encoder.
Two parallel branches, each ``3x3 conv-BN-ReLU (C -> C/4) -> attention -> 3x3
conv-BN-ReLU``, are summed and classified by a 1 x 1 convolution:

* **PAM** (position attention): ``B, C' = 1x1 convs (C -> C/8)``, ``D = 1x1 conv (C -> C)``;
  ``S = softmax_j(B_i . C'_j)`` over the ``HW`` positions (no scale);
  ``E_i = gamma * sum_j S_ij D_j + A_i``.
* **CAM** (channel attention): ``X = A A^T`` over positions, ``(C, C)``; as in the
  reference code the softmax is taken of ``max_k X_ik - X_ij`` (Fu et al.'s
  "energy_new", which favours *dissimilar* channels and is numerically tame);
  ``E = gamma * softmax(.) A + A``.

``gamma`` starts at 0 in both, so each attention module is the identity at
initialisation. The class map (stride 8) is bilinearly upsampled to the input size
(``align_corners=True`` as the reference's ``up_kwargs``).

What is left open / what we chose:

* **Encoder.** Fu et al. use a dilated ResNet-101 (deep stem, ImageNet weights). To
  keep the size near the other baselines (U-Net: ~31M at width 64) we use a dilated
  ResNet-34 (BasicBlocks ``[3, 4, 6, 3]``, widths ``w, 2w, 4w, 8w``, torchvision's
  7 x 7 stem) trained from scratch: the last two stages use stride 1 with dilation 2
  and 4 (the first block of each uses the previous dilation, as in torchvision's
  ``replace_stride_with_dilation``), giving output stride 8. At ``base_width=64``:
  22,774,755 parameters (one input channel, one class), of which 21,278,400 in the
  encoder.
* **Heads.** The reference adds auxiliary PAM-only and CAM-only classifiers for deep
  supervision; they are omitted (single logits output, every parameter used).
* ``Dropout2d(0.1)`` before the classifier as in the reference (option ``dropout``).
* Narrow widths keep at least one query/key channel: ``max(1, C // 8)``.
* ``size_multiple = 8``.

Note: with ``gamma = 0`` the query/key/value convolutions of PAM receive exactly zero
gradient on the first step (only ``gamma`` does); they train once ``gamma`` moves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hepaseg.models.base import SegmentationModel, check_positive
from hepaseg.models.blocks import ConvBNReLU
from hepaseg.models.cenet import ResNet34Encoder
from hepaseg.models.registry import register_model

__all__ = [
    "ChannelAttention",
    "DANet",
    "DualAttentionHead",
    "PositionAttention",
    "danet",
]


class PositionAttention(nn.Module):
    """PAM: ``(N, C, H, W) -> (N, C, H, W)``, identity while ``gamma == 0``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        qk = max(1, channels // 8)
        self.query = nn.Conv2d(channels, qk, 1)
        self.key = nn.Conv2d(channels, qk, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The position attention map ``S``: ``(N, HW, HW)``, rows sum to 1 (for inspection)."""
        q = self.query(x).flatten(2).transpose(1, 2)  # (N, HW, C/8)
        k = self.key(x).flatten(2)  # (N, C/8, HW)
        return torch.softmax(q @ k, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # Positions as the sequence axis of one head: (N, 1, HW, channels).
        q, k, v = (
            conv(x).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.query, self.key, self.value)
        )
        # softmax(q k^T) v without the HW x HW map in memory; scale 1 as in the paper.
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (N, 1, HW, C)
        out = out.squeeze(1).transpose(1, 2).reshape(n, c, h, w)
        return self.gamma * out + x


class ChannelAttention(nn.Module):
    """CAM: ``(N, C, H, W) -> (N, C, H, W)``, identity while ``gamma == 0``. No convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The channel attention map: ``(N, C, C)``, rows sum to 1."""
        a = x.flatten(2)  # (N, C, HW)
        energy = a @ a.transpose(1, 2)  # (N, C, C)
        # Reference code: softmax of (row max - energy), not of energy itself.
        energy = energy.amax(dim=-1, keepdim=True) - energy
        return torch.softmax(energy, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (self.attention(x) @ x.flatten(2)).reshape(x.shape)  # (N, C, HW) -> (N, C, H, W)
        return self.gamma * out + x


class DualAttentionHead(nn.Module):
    """PAM and CAM branches summed, then dropout and a 1 x 1 classifier.

    ``(N, C, h, w) -> (N, num_classes, h, w)``; the branches work at ``C // 4`` channels.
    """

    def __init__(self, in_channels: int, num_classes: int, *, dropout: float) -> None:
        super().__init__()
        inter = max(1, in_channels // 4)
        self.pam_in, self.cam_in = ConvBNReLU(in_channels, inter), ConvBNReLU(in_channels, inter)
        self.pam, self.cam = PositionAttention(inter), ChannelAttention()
        self.pam_out, self.cam_out = ConvBNReLU(inter, inter), ConvBNReLU(inter, inter)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(inter, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.pam_out(self.pam(self.pam_in(x))) + self.cam_out(self.cam(self.cam_in(x)))
        return self.classifier(fused)


class DANet(SegmentationModel):
    """DANet: dilated ResNet-34 encoder (stride 8) -> dual attention head -> upsampling.

    Args:
        in_channels: input channels (default 1).
        num_classes: output channels (default 1).
        base_width: encoder width ``w`` (stages ``w, 2w, 4w, 8w``; default 64).
        dropout: ``Dropout2d`` probability before the classifier, in ``[0, 1)`` (default 0.1).

    Input ``(N, in_channels, H, W)``; output logits ``(N, num_classes, H, W)``.
    """

    def __init__(
        self, *, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, dropout: float = 0.1
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes, base_width=base_width)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.in_channels, self.num_classes, self.size_multiple = in_channels, num_classes, 8
        # Dilated ResNet-34: stages 3-4 trade stride for dilation 2 and 4 (output stride 8).
        self.encoder = ResNet34Encoder(in_channels, base_width, dilations=(1, 1, 2, 4))
        self.head = DualAttentionHead(8 * base_width, num_classes, dropout=float(dropout))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.encoder(x)[-1])  # (N, num_classes, H/8, W/8)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


@register_model(
    paper="Fu et al., CVPR 2019",
    module="dilated ResNet-34 (stride 8) + position (PAM) and channel (CAM) attention, summed",
)
def danet(*, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, **options) -> DANet:
    """DANet; options: ``dropout`` (before the classifier, default 0.1)."""
    return DANet(in_channels=in_channels, num_classes=num_classes, base_width=base_width, **options)
