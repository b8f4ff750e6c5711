"""CS-Net (Mou et al., "CS-Net: Channel and Spatial Attention Network for
Curvilinear Structure Segmentation", MICCAI 2019) — the paper's "CS-Net" row of Table 1.

Defining module: the *affinity attention* on the bottleneck of a residual
encoder-decoder, the sum of two self-attention blocks on ``(N, C, H, W)``:

* **spatial attention**: query = ``1x3 conv-BN-ReLU (C -> C/8)``, key = ``3x1
  conv-BN-ReLU (C -> C/8)`` (the asymmetric kernels favour elongated structures),
  value = ``1x1 conv (C -> C)``; ``S = softmax_j(q_i . k_j)`` over the ``HW`` positions;
  ``out_i = gamma_s * sum_j S_ij v_j + x_i``.
* **channel attention**: ``X = x x^T`` over positions ``(C, C)``; softmax of
  ``max_k X_ik - X_ij`` (the reference code's form, as DANet's CAM);
  ``out = gamma_c * softmax(.) x + x``.

``affinity(x) = spatial(x) + channel(x)`` and the bottleneck passed on is
``x + affinity(x)`` (reference code). Both ``gamma`` start at 0.

Encoder: five residual blocks (3x3 conv-BN-ReLU x 2 plus a 1 x 1 shortcut, ReLU after
the sum) with 2 x 2 max-pools between them, widths ``w, 2w, 4w, 8w, 16w``; decoder:
2 x 2 transposed convs (halving channels), concatenation with the skip, double
3 x 3 conv-BN-ReLU; a 1 x 1 convolution gives the logits. This follows the authors'
code (github.com/iMED-Lab/CS-Net, ``model/csnet.py``).

What is left open / what we chose:

* **Width.** The paper's network is ``base_width=32`` (32 .. 512): 8,401,123
  parameters here (one input channel, one class). The reference's reported ~8.9M
  includes its ``attention_fuse`` 1 x 1 convolution (524,800 parameters) that is
  defined but never called; we leave it out so every parameter is used. The
  registry default ``base_width=64`` (shared by all hepaseg models) gives 33.6M.
* Convolutions keep their biases as in the reference (even before BN).
* Narrow widths keep at least one query/key channel: ``max(1, C // 8)``.
* The reference ends with a sigmoid; we return raw logits. ``size_multiple = 16``.

Note: with ``gamma = 0`` the query/key/value layers of the spatial block receive
exactly zero gradient on the first step (only the gammas do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hepaseg.models.base import SegmentationModel, check_positive

# CS-Net's channel attention is DANet's CAM (softmax of row max - affinity, gamma init 0), as in its code.
from hepaseg.models.danet import ChannelAttention
from hepaseg.models.registry import register_model

__all__ = [
    "AffinityAttention",
    "CSNet",
    "ChannelAttention",
    "DecoderBlock",
    "ResEncoderBlock",
    "SpatialAttention",
    "csnet",
]


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 3
) -> nn.Sequential:
    """Conv (with bias, as the reference) -> BN -> ReLU, size-preserving ('same' padding)."""
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, k, padding=(k[0] // 2, k[1] // 2)),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResEncoderBlock(nn.Module):
    """``relu(convs(x) + conv1x1(x))``. ``(N, in, H, W) -> (N, out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            _conv_bn_relu(in_channels, out_channels), _conv_bn_relu(out_channels, out_channels)
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.convs(x) + self.shortcut(x))


class DecoderBlock(nn.Module):
    """2x2 transposed conv (in -> in/2), concat with the skip, two conv-BN-ReLU.

    ``up(N, in, H, W), skip(N, in/2, 2H, 2W) -> (N, out, 2H, 2W)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        self.convs = nn.Sequential(
            _conv_bn_relu(in_channels, out_channels), _conv_bn_relu(out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([skip, self.up(x)], dim=1))  # skip first, as the reference


class SpatialAttention(nn.Module):
    """Spatial self-attention with 1x3 query / 3x1 key. ``(N, C, H, W) -> (N, C, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        qk = max(1, channels // 8)
        self.query = _conv_bn_relu(channels, qk, (1, 3))
        self.key = _conv_bn_relu(channels, qk, (3, 1))
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The affinity map ``(N, HW, HW)``, rows sum to 1 (for inspection)."""
        q = self.query(x).flatten(2).transpose(1, 2)  # (N, HW, C/8)
        return torch.softmax(q @ self.key(x).flatten(2), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = (
            layer(x).flatten(2).transpose(1, 2).unsqueeze(1) for layer in (self.query, self.key, self.value)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (N, 1, HW, C); unscaled, as the reference
        out = out.squeeze(1).transpose(1, 2).reshape(n, c, h, w)
        return self.gamma * out + x


class AffinityAttention(nn.Module):
    """``spatial(x) + channel(x)``. ``(N, C, H, W) -> (N, C, H, W)``; equals ``2x`` at init."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.spatial = SpatialAttention(channels)
        self.channel = ChannelAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(x) + self.channel(x)


class CSNet(SegmentationModel):
    """CS-Net: residual encoder -> affinity attention -> decoder with concatenated skips.

    Args:
        in_channels: input channels (default 1).
        num_classes: output channels (default 1).
        base_width: first-level width ``w``; levels ``w .. 16w`` (default 64; the paper's is 32).

    Input ``(N, in_channels, H, W)``; output logits ``(N, num_classes, H, W)``.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 1, base_width: int = 64) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes, base_width=base_width)
        self.in_channels, self.num_classes, self.size_multiple = in_channels, num_classes, 16
        widths = [base_width * 2**i for i in range(5)]  # w, 2w, 4w, 8w, 16w

        self.encoders = nn.ModuleList(
            ResEncoderBlock(prev, width) for prev, width in zip([in_channels, *widths[:-1]], widths)
        )
        self.attention = AffinityAttention(widths[4])
        self.decoders = nn.ModuleList(DecoderBlock(widths[i + 1], widths[i]) for i in range(3, -1, -1))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else F.max_pool2d(x, 2))  # (N, w * 2**i, H / 2**i, W / 2**i)
            skips.append(x)
        x = skips.pop()  # (N, 16w, H/16, W/16)
        x = x + self.attention(x)  # reference: input_feature + affinity_attention(input_feature)
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        return self.head(x)


@register_model(
    paper="Mou et al., MICCAI 2019",
    module="residual encoder-decoder with spatial (1x3/3x1 query/key) + channel affinity attention",
)
def csnet(*, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, **options) -> CSNet:
    """CS-Net; no architecture options (``base_width=32`` is the paper's network)."""
    return CSNet(in_channels=in_channels, num_classes=num_classes, base_width=base_width, **options)
