"""The context aggregation block (CAB) of MFCNet (Pang et al., PAKDD 2020).

The block refines a feature map ``X`` of shape ``(B, C, H, W)`` with two
extractors whose outputs are summed::

    spatial  Q = f(w1 X + b1), K = f(w2 X + b2)     (B, N, C/r), N = H * W
             M = softmax_rows(Q K^T)                 (B, N, N); row j weighs all positions i for j
             X^s = alpha * (M F) + X                 F = X reshaped to (B, N, C) (no value projection)
    channel  E = F^T F                               (B, C, C)
             A = softmax_rows(E)                     row c: weights of all input channels d for channel c
             X^c = beta * (F A^T) + X
    output   X^s + X^c

Choices the paper leaves open (and why):

* ``f`` is the identity by default (``qk_activation="identity"``), as in DANet's
  position attention, so similarities can be negative and the softmax can push
  dissimilar positions *down*; ``"relu"`` is available for the other reading.
* The reduction ratio ``r`` of the query/key width defaults to 8 (DANet's C/8);
  the reduced width is ``max(1, C // r)``.
* No value projection: ``F`` is ``X`` itself ("a light model with very few
  additional parameters").
* No key bias ``b2`` when ``f`` is the identity: it adds ``q_j . b2`` to every logit
  of row ``j``, which the row softmax cancels, so it would be a parameter whose
  gradient is identically zero. The block then adds ``2 C (C/r) + C/r + 2``
  parameters (``+ C/r`` for the key bias with ``f = ReLU``, where it matters).
* No ``1/sqrt(d)`` temperature: the paper's ``softmax(K^T Q)`` has none, so both
  implementations pass ``scale=1.0``.
* The channel softmax is over the input channels (rows of ``A`` sum to 1).
  ``torch.softmax`` subtracts the row maximum internally for stability; we do
  *not* copy DANet's ``max(E) - E`` trick, which flips the sign of the energies.
  The channel energies are sums over all ``N`` positions and are large, so they
  are computed in float32 even under autocast (bfloat16 would round them by
  several units and scramble the softmax).
* ``alpha`` and ``beta`` are learnable scalars initialised to 0, so a fresh block
  returns exactly ``X^s + X^c = 2 X``: each extractor starts as the identity and
  learns how much context to add. The factor 2 is the paper's sum, kept as is;
  in MFCNet every consumer of a block output is a convolution followed by
  BatchNorm, which absorbs the constant scale (exactly so for bias-free convs in
  training mode), so nothing is rescaled.

The spatial extractor never builds the ``N x N`` matrix in the default
``attention_impl="sdpa"``: it calls
:func:`torch.nn.functional.scaled_dot_product_attention`, whose fused kernels
(flash attention on CPU; flash, cuDNN or memory-efficient attention on CUDA, the
latter alone in float32) keep memory ``O(N)``: 1 GiB instead of 33 GiB for the
spatial extractor at 128 x 128 x 256, batch 8 (an H200, bfloat16, forward + backward).
Those kernels need equal query/key and value widths, so ``Q`` and ``K`` (width ``d = C/r``) are zero-padded
to a head width ``D = min(C, 256)`` (256: the widest head of PyTorch's CUDA flash
kernels), which leaves ``Q K^T`` unchanged, and ``F`` (width ``C``) is split into
``ceil(C / D)`` heads of width ``D`` (zero-padded when ``D`` does not divide ``C``)
that share one ``Q``/``K`` (expanded, not copied); every head therefore uses the
same attention matrix ``M`` and the concatenated heads equal ``M F``.
``attention_impl="naive"`` is the explicit ``bmm`` + ``softmax`` reference that
the tests compare against.

Interpretability: :meth:`ContextAggregation.forward_with_attention` returns,
besides the output, the channel attention ``A`` ``(B, C, C)``, the spatial
attention rows of chosen positions ``(B, P, H, W)`` and, on request, the full
spatial map ``(B, N, N)``; :meth:`hepaseg.models.mfcnet.MFCNet.capture_context`
uses it to record every block of a network during one forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ContextRecord", "SpatialContext", "ChannelContext", "ContextAggregation"]

AttentionImpl = Literal["sdpa", "naive"]
_MAX_HEAD_WIDTH = 256  # widest head of PyTorch's CUDA flash-attention kernels
QKActivation = Literal["identity", "relu"]


@dataclass
class ContextRecord:
    """What one context block saw and computed in one forward pass (all tensors detached).

    Attributes:
        stage: encoder level of the block (1 = full resolution, ``l`` = ``1 / 2**(l-1)``).
        stride: input pixels per block pixel along each axis (``2**(stage-1)``).
        input: block input ``X``, ``(B, C, h, w)``.
        output: block output ``X^s + X^c``, ``(B, C, h, w)``.
        channel_attention: ``A``, ``(B, C, C)``; row ``c`` holds the weights of the
            input channels that make up refined channel ``c`` (rows sum to 1).
        query_points: the requested points in input-image pixels ``(y, x)``.
        block_points: the same points at the block's resolution ``(y // stride, x // stride)``.
        spatial_rows: ``(B, P, h, w)``: for query ``p``, how much every position
            contributes to the refined feature at ``block_points[p]`` (sums to 1);
            ``None`` without query points.
        spatial_attention: the full map ``M``, ``(B, N, N)`` with ``N = h * w``,
            rows indexed by the refined position in row-major order; ``None`` unless
            ``full_spatial=True``.
        alpha: the block's spatial weight (float).
        beta: the block's channel weight (float).
    """

    stage: int
    stride: int
    input: torch.Tensor
    output: torch.Tensor
    channel_attention: torch.Tensor
    query_points: list[tuple[int, int]]
    block_points: list[tuple[int, int]]
    spatial_rows: torch.Tensor | None
    spatial_attention: torch.Tensor | None
    alpha: float
    beta: float


def _check_impl(attention_impl: str) -> None:
    if attention_impl not in ("sdpa", "naive"):
        raise ValueError(f"attention_impl must be 'sdpa' or 'naive', got {attention_impl!r}")


class SpatialContext(nn.Module):
    """Spatial context extractor: ``X^s = alpha * M F + X`` (see the module docstring).

    Args:
        channels: ``C`` of the input ``(B, C, H, W)``.
        reduction: ``r``; queries and keys have ``max(1, C // r)`` channels.
        qk_activation: ``f`` after the query/key 1 x 1 convolutions: ``"identity"`` or ``"relu"``.
        attention_impl: ``"sdpa"`` (fused, ``O(N)`` memory) or ``"naive"`` (explicit ``N x N``).
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 8,
        qk_activation: QKActivation = "identity",
        attention_impl: AttentionImpl = "sdpa",
    ) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction <= 0:
            raise ValueError(f"reduction must be a positive integer, got {reduction!r}")
        if qk_activation not in ("identity", "relu"):
            raise ValueError(f"qk_activation must be 'identity' or 'relu', got {qk_activation!r}")
        _check_impl(attention_impl)
        self.channels = channels
        self.qk_channels = max(1, channels // reduction)
        self.attention_impl = attention_impl
        self.query = nn.Conv2d(channels, self.qk_channels, kernel_size=1)
        # The key bias cancels in the row softmax unless f is non-linear (module docstring).
        self.key = nn.Conv2d(channels, self.qk_channels, kernel_size=1, bias=qk_activation == "relu")
        self.activation = nn.ReLU() if qk_activation == "relu" else nn.Identity()
        self.alpha = nn.Parameter(torch.zeros(1))

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Q, K`` ``(B, N, C/r)`` and ``F`` ``(B, N, C)`` in one dtype (the convs' under autocast)."""
        q = self.activation(self.query(x)).flatten(2).transpose(1, 2)  # (B, N, d)
        k = self.activation(self.key(x)).flatten(2).transpose(1, 2)  # (B, N, d)
        v = x.flatten(2).transpose(1, 2).to(q.dtype)  # (B, N, C); a view for channels_last input
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``M F`` ``(B, N, C)`` with ``M = softmax_rows(Q K^T)``, without scale."""
        if self.attention_impl == "naive":
            m = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)  # (B, N, N)
            return torch.bmm(m, v)
        # The fused CPU kernels need unit stride in the last axis (NCHW input gives stride N).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, n, d = q.shape
        c = v.shape[-1]
        # The fused kernels want equal query and value widths. Zero-padding Q and K up to the
        # head width leaves Q K^T unchanged; F is split into heads of that width that share
        # Q and K (expand() costs no memory). Wide heads mean few heads, and every head
        # recomputes the N x N softmax: with d-wide heads (8 for r = 8) bf16 training on CPU
        # ran 3-6x slower than with one C-wide head (measured at N = 1024 and 3136).
        width = min(c, max(d, _MAX_HEAD_WIDTH))
        if d < width:
            q, k = F.pad(q, (0, width - d)), F.pad(k, (0, width - d))
        heads = math.ceil(c / width)
        if heads * width != c:
            v = F.pad(v, (0, heads * width - c))  # zero channels: their outputs are zero and cropped below
        vh = v.reshape(b, n, heads, width).transpose(1, 2)  # (B, heads, N, width)
        qh = q.unsqueeze(1).expand(b, heads, n, width)
        kh = k.unsqueeze(1).expand(b, heads, n, width)
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=1.0)  # (B, heads, N, width)
        return out.transpose(1, 2).reshape(b, n, heads * width)[..., :c]

    def combine(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``alpha * context + X`` with ``context`` ``(B, N, C)`` reshaped to ``x``'s ``(B, C, H, W)``."""
        b, c, h, w = x.shape
        context = context.transpose(1, 2).reshape(b, c, h, w)  # channels_last when x is
        # alpha.to(x.dtype): a float32 (1,)-shaped parameter would promote bf16 features to
        # float32 under autocast, and every later layer would pay for casts and layout copies.
        return self.alpha.to(x.dtype) * context.to(x.dtype) + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        q, k, v = self.queries_keys_values(x)
        return self.combine(x, self.attend(q, k, v))


class ChannelContext(nn.Module):
    """Channel context extractor: ``X^c = beta * F A^T + X`` with ``A = softmax_rows(F^T F)``.

    No learned projection (``Q = K = F = X``); the only parameter is ``beta``.
    The energies and the softmax run in float32 (see the module docstring).
    """

    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(1))

    @staticmethod
    def attention(x: torch.Tensor) -> torch.Tensor:
        """``A`` ``(B, C, C)`` float32 for ``x`` ``(B, C, H, W)``; rows sum to 1."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            f = x.float().flatten(2)  # (B, C, N)
            energy = torch.bmm(f, f.transpose(1, 2))  # (B, C, C)
            return torch.softmax(energy, dim=-1)

    def combine(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """``beta * A X + X`` for ``x`` ``(B, C, H, W)`` and ``attention`` ``(B, C, C)``."""
        b, c, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            context = torch.bmm(attention, x.float().flatten(2))  # (B, C, N)
        context = context.reshape(b, c, h, w).to(x.dtype)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            context = context.contiguous(memory_format=torch.channels_last)  # keep the input's layout
        return self.beta.to(x.dtype) * context + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        return self.combine(x, self.attention(x))


class ContextAggregation(nn.Module):
    """Context aggregation block: ``SpatialContext(X) + ChannelContext(X)``; ``(B, C, H, W)`` in and out.

    A fresh block (``alpha = beta = 0``) returns exactly ``2 X``.

    Args:
        channels: ``C``.
        reduction: query/key reduction ``r`` of the spatial extractor (default 8).
        qk_activation: ``"identity"`` (default) or ``"relu"``.
        attention_impl: ``"sdpa"`` (default) or ``"naive"``; same result, different memory.

    Example::

        >>> block = ContextAggregation(32)
        >>> x = torch.randn(2, 32, 14, 14)
        >>> torch.equal(block(x), 2 * x)
        True
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 8,
        qk_activation: QKActivation = "identity",
        attention_impl: AttentionImpl = "sdpa",
    ) -> None:
        super().__init__()
        self.spatial = SpatialContext(
            channels, reduction=reduction, qk_activation=qk_activation, attention_impl=attention_impl
        )
        self.channel = ChannelContext()

    @property
    def attention_impl(self) -> str:
        return self.spatial.attention_impl

    @attention_impl.setter
    def attention_impl(self, value: str) -> None:
        _check_impl(value)
        self.spatial.attention_impl = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(x) + self.channel(x)

    def forward_with_attention(
        self,
        x: torch.Tensor,
        *,
        query_positions: list[tuple[int, int]] | None = None,
        full_spatial: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """Output plus attention maps, for explanation; the output equals :meth:`forward`'s.

        Args:
            x: ``(B, C, h, w)``.
            query_positions: ``(y, x)`` at this block's resolution whose spatial
                attention rows to return.
            full_spatial: also return the full ``(B, N, N)`` map (memory ``N**2``).

        Returns:
            ``(output, maps)``; ``maps`` holds detached ``"channel_attention"``
            ``(B, C, C)``, ``"spatial_rows"`` ``(B, P, h, w)`` or ``None`` and
            ``"spatial_attention"`` ``(B, N, N)`` or ``None``.
        """
        b, _, h, w = x.shape
        q, k, v = self.spatial.queries_keys_values(x)
        out_s = self.spatial.combine(x, self.spatial.attend(q, k, v))
        a = self.channel.attention(x)
        out = out_s + self.channel.combine(x, a)
        maps: dict[str, torch.Tensor | None] = {
            "channel_attention": a.detach(),
            "spatial_rows": None,
            "spatial_attention": None,
        }
        with torch.no_grad():
            if query_positions:
                index = torch.tensor([y * w + x_ for y, x_ in query_positions], device=x.device)
                logits = torch.bmm(q[:, index].float(), k.float().transpose(1, 2))  # (B, P, N)
                maps["spatial_rows"] = torch.softmax(logits, dim=-1).reshape(b, len(index), h, w)
            if full_spatial:
                logits = torch.bmm(q.float(), k.float().transpose(1, 2))  # (B, N, N)
                maps["spatial_attention"] = torch.softmax(logits, dim=-1)
        return out, maps
