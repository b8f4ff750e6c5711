"""Shared base class: one input check and pad-to-multiple for every network.

Networks implement :meth:`SegmentationModel.forward_features` for inputs whose
height and width are multiples of ``size_multiple``; :meth:`forward` checks the
input once, zero-pads (bottom/right) to that multiple and crops
the logits back, so every model accepts any ``H, W`` (512 x 512 and odd sizes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SegmentationModel", "check_positive"]


def check_positive(**values: int) -> None:
    """Raise ``ValueError`` naming the first argument that is not a positive integer (bools refused)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class SegmentationModel(nn.Module):
    """Base for all hepaseg networks.

    Subclasses set ``self.in_channels``, ``self.num_classes`` and
    ``self.size_multiple`` (2 ** number of downsamplings) and implement
    ``forward_features(x) -> logits`` for padded inputs.

    Input ``(N, in_channels, H, W)`` float; output raw logits
    ``(N, num_classes, H, W)`` (no sigmoid: thresholds live in inference).
    """

    in_channels: int
    num_classes: int
    size_multiple: int = 16

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def architecture_options(self) -> dict[str, Any]:
        """Resolved architecture options (defaults filled in, JSON-ready) that a checkpoint records.

        Networks without options return ``{}``; see :meth:`hepaseg.models.mfcnet.MFCNet.architecture_options`.
        """
        return {}

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects a 4D tensor (N, C, H, W), got {shape}; "
                "add a batch and channel axis with x[None, None] for one 2D slice"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} was built with in_channels={self.in_channels}, "
                f"got an input with {x.shape[1]} channels (shape {tuple(x.shape)})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        h, w = x.shape[-2:]
        m = self.size_multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            # Zero padding at the bottom/right: the windowed CT is scaled to [0, 1]
            # with 0 = air/fat below the window, so zeros look like the scan border.
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = self.forward_features(x)
        return logits[..., :h, :w]
