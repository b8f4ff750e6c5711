"""MFCNet (Pang et al., "Correlation Matters: Multi-scale Fine-grained Contextual Information
Extraction for Hepatic Tumor Segmentation", PAKDD 2020), as far as its slides describe it.

Defining module: the *context aggregation block* (CAB, :mod:`hepaseg.models.context`),
a spatial plus a channel self-attention without value projection, applied to the encoder
features of a U-Net at several scales ("multi-scale fine-grained contextual information").

Architecture (ours): the five-level :class:`~hepaseg.models.unet.UNet` (widths ``w .. 16w``,
DoubleConv units, max-pool down, transposed-conv up) with one block at each level ``l`` in
``context_stages``.

What the slides leave open and what we chose (every item is our choice, not the slides'):

* **Which levels.** The slides show the block on a ``28 x 28 x 256`` feature map and name
  neither the backbone nor the input size. In this U-Net level ``l`` has resolution
  ``1 / 2**(l-1)`` and ``w * 2**(l-1)`` channels, so a ``28 x 28 x 256`` map is level 3 at
  width 64 for a 112 px input, or level 4 at width 32 for a 224 px input. "Multi-scale" means
  several levels; the default ``context_stages=(3, 4, 5)`` puts one block at 1/4, 1/8 and
  1/16 resolution. Levels 1-2 are left out: at a 512 x 512 slice they give ``N = 262144`` /
  ``65536`` positions, where even an ``O(N)``-memory kernel costs ``N**2 C`` time, and their
  ``w``/``2w`` channels carry little semantics.
* **Where the refined features go** (``placement``). The slides do not say. ``"skip"``
  (default, the only form before the option existed): the blocks' outputs feed only the
  decoder -- the skip connections of levels ``l <= 4`` and the bottleneck input for
  ``l = 5`` -- and the encoder keeps computing from the raw features, so MFCNet's encoder is
  exactly U-Net's and the blocks at different scales work in parallel. ``"inline"``: level
  ``l + 1`` is computed from the refined level ``l``, so deeper blocks see refined features.
  Measured (two-patient crossval, 2 seeds x 2 folds, README "MFCNet's options, measured"):
  ``"inline"`` scored 2.4 and 3.2 points lower Dice 3D in the two folds, so ``"skip"`` stays.
* **Channel extractor** (``channel_form``): the slides' literal ``X' = F M`` (``"slides"``,
  default) or DANet's ``F M^T`` (``"danet"``); the two differ (:mod:`hepaseg.models.context`).
  Measured alike (within 0.8 points per fold, inside the seed spread), so the slides' form is
  the default; checkpoints from before the option existed were ``"danet"`` and still load so.
* **f** in ``Q = f(w1 X + b1)`` (``qk_activation``): the slides name it without defining it;
  identity by default (as DANet's position attention), ``"relu"`` as the alternative. Measured
  alike: ReLU +0.4 points Dice 3D in each fold, inside the seed spread, with more false-positive
  lesions, so the identity stays.
* **Reduction ratio** ``r = 8`` of the query/key width (``reduction``), ``F = X`` (no value
  projection), no ``1/sqrt(d)`` temperature, float32 channel energies: see
  :mod:`hepaseg.models.context`.
* **Initial state.** ``alpha = beta = 0``, so a fresh block returns ``2 E_l`` (the
  slides' sum ``X^s + X^c`` of two identities). Every consumer of a block output is a
  convolution followed by BatchNorm (the decoder's DoubleConv after the concatenation;
  for level 5 the transposed conv then DoubleConv; with ``"inline"`` also the next encoder
  level), so the factor 2 only changes the initial balance between skip and upsampled
  features in the first decoder conv; we keep the slides' formula rather than halving it.
* **Parameters.** Each block adds ``2 C^2/r + C/r + 2``; with the default stages the
  network has about 1.1 % more parameters than U-Net at the same width.

The resolved architecture options (every default filled in) are what a checkpoint
records (:meth:`MFCNet.architecture_options`), so a later change of a default does not
change what an old checkpoint rebuilds.

Interpretability (used by ``hepaseg explain`` to draw the paper's Fig. 1)::

    model.eval()
    with model.capture_context(query_points=[(y, x)], full_spatial=False) as records:
        logits = model(image)                   # (B, C_in, H, W); output unchanged by capture
    rec = records[4]                            # ContextRecord of the level-4 (1/8) block
    rec.spatial_rows[0, 0]                      # (h, w): what position (y // 8, x // 8) attends to
    rec.channel_attention[0]                    # (C, C), rows sum to 1
    rec.input, rec.output                       # X and X^s + X^c, (B, C, h, w)

Query points are ``(row, column)`` in pixels of the *input* image (before padding) and
map to ``(y // stride, x // stride)`` at a block of stride ``2**(l-1)``. The full
``(B, N, N)`` spatial map is kept only with ``full_spatial=True``. Records are detached;
a second forward pass inside the same ``with`` overwrites them. Outside the ``with``
nothing is recorded and no extra memory is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from hepaseg.models.context import (
    CHANNEL_FORMS,
    AttentionImpl,
    ChannelForm,
    ContextAggregation,
    ContextRecord,
    QKActivation,
)
from hepaseg.models.registry import register_model

__all__ = ["MFCNet", "mfcnet", "ContextRecord", "DEFAULT_CONTEXT_STAGES", "PLACEMENTS"]


# The factory comes first, before ``unet`` is imported (which registers ``unet``), so that
# list_models() keeps the order of the paper's Table 1 with mfcnet first.
@register_model(
    paper="Pang et al., PAKDD 2020",
    module="context aggregation blocks (spatial + channel self-attention, no value projection) at 1/4-1/16",
    # Before checkpoints recorded resolved options, the channel extractor was DANet's form.
    legacy_options={"channel_form": "danet"},
)
def mfcnet(*, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, **options) -> MFCNet:
    """MFCNet; options ``context_stages``, ``placement``, ``channel_form``, ``reduction``,
    ``qk_activation``, ``attention_impl``.

    See :class:`MFCNet` for their meaning and defaults.
    """
    return MFCNet(in_channels=in_channels, num_classes=num_classes, base_width=base_width, **options)


from hepaseg.models.unet import NUM_LEVELS, UNet  # noqa: E402  (see the comment above mfcnet)

DEFAULT_CONTEXT_STAGES = (3, 4, 5)
PLACEMENTS = ("skip", "inline")
Placement = Literal["skip", "inline"]


@dataclass
class _Capture:
    query_points: list[tuple[int, int]]
    full_spatial: bool
    records: dict[int, ContextRecord]


def _check_stages(context_stages: Sequence[int]) -> tuple[int, ...]:
    valid = isinstance(context_stages, Sequence) and not isinstance(context_stages, str)
    stages = tuple(context_stages) if valid else ()
    bad = [s for s in stages if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= NUM_LEVELS]
    if not valid or bad:
        raise ValueError(
            f"context_stages must be a sequence of encoder levels in 1..{NUM_LEVELS}, "
            f"got {context_stages!r}; the default is {DEFAULT_CONTEXT_STAGES}"
        )
    if len(set(stages)) != len(stages):
        raise ValueError(f"context_stages must not repeat a level, got {context_stages!r}")
    return tuple(sorted(stages))


def _check_points(query_points: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    points = []
    for point in query_points:
        ok = isinstance(point, Sequence) and len(point) == 2
        if not ok or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in point):
            raise ValueError(
                f"query_points must hold (row, column) pairs of non-negative integer pixels, got {point!r}"
            )
        points.append((int(point[0]), int(point[1])))
    return points


class MFCNet(UNet):
    """U-Net whose encoder features at ``context_stages`` pass through context aggregation blocks.

    Args:
        in_channels: input channels (default 1).
        num_classes: output logit channels (default 1).
        base_width: channels ``w`` of level 1 (default 64); level ``l`` has ``w * 2**(l-1)``.
        context_stages: encoder levels (1..5) that get a block (default ``(3, 4, 5)``,
            i.e. 1/4, 1/8 and 1/16 resolution); ``()`` gives a plain U-Net (ablation).
        placement: ``"skip"`` (default: block outputs feed only the decoder, the encoder
            runs on raw features) or ``"inline"`` (deeper encoder levels consume them too).
        channel_form: ``"slides"`` (default, ``X' = F A``) or ``"danet"`` (``X' = F A^T``).
        reduction: query/key reduction ratio ``r`` of the spatial extractor (default 8).
        qk_activation: ``f`` on queries and keys: ``"identity"`` (default) or ``"relu"``.
        attention_impl: ``"auto"`` (default), ``"chunked"``, ``"sdpa"`` or ``"naive"``
            (:mod:`hepaseg.models.context`); same outputs, different speed and memory.

    Input ``(N, in_channels, H, W)`` of any ``H, W`` (padded to a multiple of 16);
    output raw logits ``(N, num_classes, H, W)``.

    Example::

        >>> net = MFCNet(base_width=8)
        >>> net(torch.zeros(2, 1, 64, 48)).shape
        torch.Size([2, 1, 64, 48])
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 1,
        base_width: int = 64,
        context_stages: Sequence[int] = DEFAULT_CONTEXT_STAGES,
        placement: Placement = "skip",
        channel_form: ChannelForm = "slides",
        reduction: int = 8,
        qk_activation: QKActivation = "identity",
        attention_impl: AttentionImpl = "auto",
    ) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, base_width=base_width)
        self.context_stages = _check_stages(context_stages)
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(map(repr, PLACEMENTS))}, got {placement!r}")
        if channel_form not in CHANNEL_FORMS:
            raise ValueError(
                f"channel_form must be one of {', '.join(map(repr, CHANNEL_FORMS))}, got {channel_form!r}"
            )
        self.placement = placement
        self.context = nn.ModuleDict(
            {
                str(stage): ContextAggregation(
                    self.widths[stage - 1],
                    reduction=reduction,
                    qk_activation=qk_activation,
                    channel_form=channel_form,
                    attention_impl=attention_impl,
                )
                for stage in self.context_stages
            }
        )
        # Everything that shapes the weights or the maths (not attention_impl, which only
        # changes speed and memory): what a checkpoint records, so that a later change of a
        # default cannot change what an old checkpoint rebuilds.
        self._architecture = {
            "context_stages": list(self.context_stages),
            "placement": placement,
            "channel_form": channel_form,
            "reduction": reduction,
            "qk_activation": qk_activation,
        }
        self._capture: _Capture | None = None

    def architecture_options(self) -> dict[str, Any]:
        """The resolved architecture options (defaults filled in), JSON-ready."""
        return dict(self._architecture)

    def set_attention_impl(self, attention_impl: AttentionImpl) -> None:
        """Switch every block between ``"auto"``, ``"chunked"``, ``"sdpa"`` and ``"naive"`` (weights unchanged)."""
        for block in self.context.values():
            block.attention_impl = attention_impl

    @contextlib.contextmanager
    def capture_context(
        self, query_points: Sequence[tuple[int, int]] = (), *, full_spatial: bool = False
    ) -> Iterator[dict[int, ContextRecord]]:
        """Record every context block during the forward passes inside the ``with``.

        Args:
            query_points: ``(row, column)`` pixels of the input image whose spatial
                attention rows to keep (mapped to each block's resolution).
            full_spatial: also keep the full ``(B, N, N)`` spatial map of every block.

        Yields:
            A dict ``{level: ContextRecord}``, filled by the next forward pass.
        """
        if self._capture is not None:
            raise RuntimeError("capture_context is already active on this model; nest it only once")
        records: dict[int, ContextRecord] = {}
        self._capture = _Capture(_check_points(query_points), bool(full_spatial), records)
        try:
            yield records
        finally:
            self._capture = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._capture is not None:
            self.check_input(x)
            h, w = x.shape[-2:]
            for point in self._capture.query_points:
                if point[0] >= h or point[1] >= w:
                    raise ValueError(
                        f"query_points: {point} lies outside the {h} x {w} input; use (row, column) pixels "
                        "of the input image"
                    )
        return super().forward(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "skip":
            # The encoder runs on raw features; the blocks refine its outputs for the decoder.
            features = self.encode(x)
            for stage in self.context_stages:
                features[stage - 1] = self._refine(stage, features[stage - 1])
        else:
            # Inline: level l + 1 is computed from the refined level l.
            features = []
            for stage, down in enumerate(self.encoder, start=1):
                x = down(x)
                if stage in self.context_stages:
                    x = self._refine(stage, x)
                features.append(x)
        return self.decode(features)

    def _refine(self, stage: int, feature: torch.Tensor) -> torch.Tensor:
        block = self.context[str(stage)]
        if self._capture is None:
            return block(feature)
        return self._run_captured(stage, block, feature)

    def _run_captured(self, stage: int, block: ContextAggregation, feature: torch.Tensor) -> torch.Tensor:
        capture = self._capture
        assert capture is not None
        stride = 2 ** (stage - 1)
        block_points = [(y // stride, x // stride) for y, x in capture.query_points]
        out, maps = block.forward_with_attention(
            feature, query_positions=block_points, full_spatial=capture.full_spatial
        )
        capture.records[stage] = ContextRecord(
            stage=stage,
            stride=stride,
            input=feature.detach(),
            output=out.detach(),
            channel_attention=maps["channel_attention"],
            query_points=list(capture.query_points),
            block_points=block_points,
            spatial_rows=maps["spatial_rows"],
            spatial_attention=maps["spatial_attention"],
            alpha=float(block.spatial.alpha.detach()),
            beta=float(block.channel.beta.detach()),
        )
        return out
