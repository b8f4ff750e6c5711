"""UNet++ (Zhou et al., "UNet++: A Nested U-Net Architecture for Medical Image
Segmentation", DLMIA 2018).

Defining module: *nested dense skip pathways*. Node ``X^{i,j}`` (level ``i`` = 0..4 from
fine to coarse, column ``j``) is a double-conv unit; ``X^{i,0}`` is the encoder and, for
``j >= 1``,

    X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})])

so each skip is a dense stack of convolutions that bridges the semantic gap between
encoder and decoder features. ``X^{0,1..4}`` are full-resolution outputs.

What the paper leaves open / what we chose (following the reference code,
4uiiurz1/pytorch-nested-unet ``NestedUNet``, 36.6 M parameters with filters 64..1024):

* Five levels with widths ``w, 2w, 4w, 8w, 16w``; ``H`` is the U-Net double conv
  (3 x 3 ConvBNReLU twice); ``Up`` is 2x bilinear upsampling (``align_corners=True``)
  without a convolution; 2 x 2 max-pooling down.
* ``deep_supervision=False`` (default): one 1 x 1 head on ``X^{0,4}``; no other heads are
  built, so every parameter receives a gradient.
* ``deep_supervision=True``: 1 x 1 heads on ``X^{0,1}``, ..., ``X^{0,4}``. To keep one
  interface for all networks (a single logits tensor), ``forward`` returns the *mean of
  the four heads' logits* in both training and evaluation. The paper instead sums one
  loss per head in training and averages (or prunes) at inference; averaging logits
  is our deviation, chosen so losses and inference need no model-specific code.

Convolutions followed by BatchNorm carry no bias, so our count is slightly below the
reference's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hepaseg.models.base import SegmentationModel, check_positive
from hepaseg.models.blocks import DoubleConv, OutConv
from hepaseg.models.registry import register_model

__all__ = ["NestedUNet", "nested_unet"]

_LEVELS = 5  # X^{0..4, .}


class NestedUNet(SegmentationModel):
    """UNet++ with nested dense skip pathways (five levels, four 2 x 2 poolings).

    Args:
        in_channels: input channels (default 1); must be >= 1.
        num_classes: output logit channels (default 1); must be >= 1.
        base_width: channels of level 0 (default 64); level ``i`` uses ``w * 2**i``; >= 1.
        deep_supervision: if True, average the logits of heads on ``X^{0,1..4}``
            (default False: one head on ``X^{0,4}``).

    Input ``(N, in_channels, H, W)`` of any ``H, W`` (padded to a multiple of 16);
    output raw logits ``(N, num_classes, H, W)``.

    Example::

        >>> net = NestedUNet(base_width=8, deep_supervision=True)
        >>> net(torch.zeros(2, 1, 64, 48)).shape
        torch.Size([2, 1, 64, 48])
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 1,
        base_width: int = 64,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes, base_width=base_width)
        if not isinstance(deep_supervision, bool):
            raise ValueError(f"deep_supervision must be a bool, got {deep_supervision!r}")
        self.in_channels, self.num_classes, self.size_multiple = in_channels, num_classes, 16
        self.deep_supervision = deep_supervision
        widths = [base_width * 2**i for i in range(_LEVELS)]  # w, 2w, 4w, 8w, 16w

        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        # nodes[i][j] is X^{i,j}; level i has columns j = 0 .. 4 - i.
        self.nodes = nn.ModuleList()
        for i in range(_LEVELS):
            column = nn.ModuleList([DoubleConv(in_channels if i == 0 else widths[i - 1], widths[i])])
            for j in range(1, _LEVELS - i):
                # j same-level predecessors X^{i,0..j-1} plus the upsampled X^{i+1,j-1}
                column.append(DoubleConv(j * widths[i] + widths[i + 1], widths[i]))
            self.nodes.append(column)
        n_heads = _LEVELS - 1 if deep_supervision else 1
        self.heads = nn.ModuleList(OutConv(widths[0], num_classes) for _ in range(n_heads))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # grid[i] lists X^{i,0}, X^{i,1}, ...: (N, w * 2**i, H / 2**i, W / 2**i) each.
        grid: list[list[torch.Tensor]] = [[] for _ in range(_LEVELS)]
        for i in range(_LEVELS):
            grid[i].append(self.nodes[i][0](x if i == 0 else self.pool(grid[i - 1][0])))
            # The new encoder node completes the anti-diagonal X^{i-j, j}, j = 1..i.
            for j in range(1, i + 1):
                level = i - j
                inputs = [*grid[level], self.up(grid[level + 1][j - 1])]
                grid[level].append(self.nodes[level][j](torch.cat(inputs, dim=1)))
        if not self.deep_supervision:
            return self.heads[0](grid[0][-1])
        # Heads on X^{0,1..4}; mean of their logits, (N, num_classes, H, W).
        return torch.stack([head(f) for head, f in zip(self.heads, grid[0][1:])]).mean(dim=0)


@register_model(
    paper="Zhou et al., DLMIA 2018",
    module="nested dense skip pathways X^{i,j} between encoder and decoder (bilinear upsampling)",
)
def nested_unet(*, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, **options) -> NestedUNet:
    """UNet++; options: ``deep_supervision`` (default False)."""
    return NestedUNet(in_channels=in_channels, num_classes=num_classes, base_width=base_width, **options)
