"""The context aggregation block (CAB) of MFCNet (PAKDD 2020 slides).

The block refines a feature map ``X`` of shape ``(B, C, H, W)`` with two
extractors whose outputs are summed. In the slides' notation, with ``N = H * W``
and ``F = X`` reshaped to ``(N, C)``::

    spatial  Q = f(w1 X + b1), K = f(w2 X + b2)     (N, C/r) each
             M = softmax_rows(Q K^T)                 (N, N); row j weighs all positions i for j
             X^s = alpha * (M F) + X                 (no value projection)
    channel  E = F^T F                               (C, C), symmetric
             A = softmax_rows(E)                     rows sum to 1 ("softmax over j")
             X' = F A     (channel_form="slides")    refined channel c = sum_d A[d, c] F_d
             X' = F A^T   (channel_form="danet")     refined channel c = sum_d A[c, d] F_d
             X^c = beta * X' + X
    output   X^s + X^c

The two channel forms differ: ``A`` is the row softmax of a symmetric matrix, so it
is not symmetric. ``"slides"`` is the slides' literal ``X' = F M``; ``"danet"`` is
DANet's channel attention (Fu et al., CVPR 2019), ``A F`` in ``(C, N)`` layout, whose
refined channels are convex combinations of the input channels. ``"slides"`` is the
default: measured on the two-patient crossval (2 seeds x 2 folds, README "MFCNet's
options, measured") the two forms train alike (Dice 3D within 0.8 points in each fold,
inside the seed-to-seed spread), so the slides' own formula wins. ``"danet"`` was the only
form before the option existed; checkpoints from then rebuild with it
(``legacy_options`` in the model registry).

Choices the slides leave open (ours, and why):

* ``f`` is named in ``Q = f(w1 X + b1)`` but never defined. The identity is the
  default (``qk_activation="identity"``, as in DANet's position attention), so
  similarities can be negative and the softmax can push dissimilar positions
  *down*; ``"relu"`` is the other reading. Measured on the two-patient crossval the
  two train alike (ReLU +0.4 points in each fold, inside the seed spread), so the
  identity stays.
* The reduction ratio ``r`` of the query/key width defaults to 8 (DANet's C/8);
  the reduced width is ``max(1, C // r)``.
* No value projection: ``F`` is ``X`` itself.
* No key bias ``b2`` when ``f`` is the identity: it adds ``q_j . b2`` to every logit
  of row ``j``, which the row softmax cancels, so it would be a parameter whose
  gradient is identically zero. The block then adds ``2 C (C/r) + C/r + 2``
  parameters (``+ C/r`` for the key bias with ``f = ReLU``, where it matters).
* No ``1/sqrt(d)`` temperature: the slides' softmax has none, so every
  implementation uses scale 1.
* ``torch.softmax`` subtracts the row maximum internally for stability; we do
  *not* copy DANet's ``max(E) - E`` trick, which flips the sign of the energies.
  The channel energies are sums over all ``N`` positions and are large, so they
  (and the channel product) are computed in float32 even under autocast (bfloat16
  would round them by several units and scramble the softmax).
* ``alpha`` and ``beta`` are learnable scalars initialised to 0, so a fresh block
  returns exactly ``X^s + X^c = 2 X``: each extractor starts as the identity and
  learns how much context to add. The factor 2 is the slides' sum, kept as is;
  in MFCNet every consumer of a block output is a convolution followed by
  BatchNorm, which absorbs the constant scale (exactly so for bias-free convs in
  training mode), so nothing is rescaled.

Implementations of the spatial product ``M F`` (``attention_impl``; all give the same
result, the tests hold them equal in outputs and gradients):

* ``"chunked"``: the exact softmax computed block by block (a few hundred query rows
  of one sample at a time, :func:`chunked_attention`), in float32, with a hand-written
  backward that recomputes each block's ``M`` instead of storing it. Memory is
  ``O(N)`` beyond one block, and the FLOPs are what the maths needs:
  ``2 N^2 (C/r + C)`` forward, because queries and keys keep their own width
  ``C/r``. On the 2-core Xeon (no native bf16) it was the fastest CPU path in
  float32 and bfloat16, forward and backward (README, "Benchmark").
* ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`, whose fused
  kernels (flash attention on CPU; flash, cuDNN or memory-efficient attention on
  CUDA) keep memory ``O(N)``: 1 GiB instead of 33 GiB for the spatial extractor at
  128 x 128 x 256, batch 8 (an H200, bfloat16, forward + backward). Those kernels
  need equal query/key and value widths, so ``Q`` and ``K`` (width ``d = C/r``) are
  zero-padded to a head width ``D = min(C, 256)`` (256: the widest head of PyTorch's
  CUDA flash kernels), which leaves ``Q K^T`` unchanged but makes it cost ``D / d``
  times the FLOPs, and ``F`` is split into ``ceil(C / D)`` heads of width ``D``
  (zero-padded when ``D`` does not divide ``C``) that share one ``Q``/``K``.
* ``"auto"`` (default): ``"chunked"`` on CPU; ``"sdpa"`` on other devices, while
  tracing for ONNX export or ``torch.compile`` (one fused op instead of a Python loop),
  and under bf16/fp16 autocast on CPUs with bf16 instructions (AVX512-BF16 or AMX),
  whose fused kernel multiplies in bf16 while the chunked path stays in float32 (that
  case is not measured: the development CPU has no bf16 instructions).
* ``"naive"``: the explicit ``bmm`` + ``softmax`` reference with the ``(B, N, N)``
  matrix.

Interpretability: :meth:`ContextAggregation.forward_with_attention` returns,
besides the output, the channel attention ``A`` ``(B, C, C)``, the spatial
attention rows of chosen positions ``(B, P, H, W)`` and, on request, the full
spatial map ``(B, N, N)``; :meth:`hepaseg.models.mfcnet.MFCNet.capture_context`
uses it to record every block of a network during one forward pass.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CHANNEL_FORMS",
    "ChannelContext",
    "ContextAggregation",
    "ContextRecord",
    "SpatialContext",
    "chunked_attention",
    "cpu_has_native_bf16",
]

AttentionImpl = Literal["auto", "chunked", "sdpa", "naive"]
ATTENTION_IMPLS = ("auto", "chunked", "sdpa", "naive")
ChannelForm = Literal["danet", "slides"]
CHANNEL_FORMS = ("danet", "slides")
QKActivation = Literal["identity", "relu"]
_MAX_HEAD_WIDTH = 256  # widest head of PyTorch's CUDA flash-attention kernels
# Elements of one block of attention logits in the chunked path (4 MiB of float32): small
# enough to stay in a core's L2 cache between the two matrix products and the softmax.
_CHUNK_ELEMENTS = 2**20


@dataclass
class ContextRecord:
    """What one context block saw and computed in one forward pass (all tensors detached).

    Attributes:
        stage: encoder level of the block (1 = full resolution, ``l`` = ``1 / 2**(l-1)``).
        stride: input pixels per block pixel along each axis (``2**(stage-1)``).
        input: block input ``X``, ``(B, C, h, w)``.
        output: block output ``X^s + X^c``, ``(B, C, h, w)``.
        channel_attention: ``A = softmax_rows(F^T F)``, ``(B, C, C)``, rows sum to 1.
            With ``channel_form="danet"`` row ``c`` holds the weights of the input channels
            that make up refined channel ``c``; with ``"slides"`` column ``c`` does.
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


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


# --- the chunked exact attention ----------------------------------------------------------------


def _blocks(batch: int, n: int) -> list[tuple[slice, slice]]:
    """(batch slice, query-row slice) pairs covering ``(batch, n)``, each ``<= _CHUNK_ELEMENTS`` logits."""
    rows = max(1, min(n, _CHUNK_ELEMENTS // n))
    group = max(1, _CHUNK_ELEMENTS // (rows * n)) if rows == n else 1  # whole samples when N is small
    return [
        (slice(b, min(b + group, batch)), slice(s, min(s + rows, n)))
        for b in range(0, batch, group)
        for s in range(0, n, rows)
    ]


class _ChunkedAttention(torch.autograd.Function):
    """``softmax_rows(Q K^T) V`` in float32, block by block; backward recomputes each block's ``M``.

    The flash-attention backward (Dao, 2022) written with dense block products:
    ``dV += M^T dO``, ``dS = M * (dO V^T - rowsum(dO * O))``, ``dQ = dS K``, ``dK += dS^T Q``.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=q.device.type, enabled=False):
            q32, k32, v32 = q.float(), k.float(), v.float()
            b, n, _ = q32.shape
            out = q32.new_empty(b, n, v32.shape[-1])  # (B, N, C)
            for bs, rows in _blocks(b, n):
                m = torch.softmax(torch.bmm(q32[bs, rows], k32[bs].transpose(1, 2)), dim=-1)  # (g, n, N)
                torch.bmm(m, v32[bs], out=out[bs, rows])
        # The inputs themselves (not float32 copies) are saved: backward recasts them.
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out = ctx.saved_tensors
        with torch.autocast(device_type=q.device.type, enabled=False):
            q32, k32, v32, grad = q.float(), k.float(), v.float(), grad.float()
            dq, dk, dv = torch.empty_like(q32), torch.zeros_like(k32), torch.zeros_like(v32)
            delta = (grad * out).sum(-1, keepdim=True)  # (B, N, 1): rowsum(dO * O) = rowsum(M * dP)
            for bs, rows in _blocks(q32.shape[0], q32.shape[1]):
                qb, kb, gb = q32[bs, rows], k32[bs], grad[bs, rows]
                m = torch.softmax(torch.bmm(qb, kb.transpose(1, 2)), dim=-1)  # (g, n, N), recomputed
                dv[bs].baddbmm_(m.transpose(1, 2), gb)  # accumulates in the product (no temporary)
                ds = torch.bmm(gb, v32[bs].transpose(1, 2)).sub_(delta[bs, rows]).mul_(m)  # d logits
                torch.bmm(ds, kb, out=dq[bs, rows])
                dk[bs].baddbmm_(ds.transpose(1, 2), qb)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# Under torch.compile an explicit "chunked" runs eagerly (a graph break): traced, its Python loop
# unrolls into a long graph that compiled for minutes and ran slower than eager (56 x 56 x 128).
# "auto" takes the SDPA path there: compiled training steps were faster with it than with the
# graph breaks (README, "Benchmark").
@torch.compiler.disable
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact ``softmax_rows(Q K^T) V`` (no scale) in float32 without the ``(B, N, N)`` matrix.

    Args:
        q, k: ``(B, N, d)``; any strides, any float dtype.
        v: ``(B, N, c)``; the widths ``d`` and ``c`` may differ.

    Returns:
        ``(B, N, c)`` float32, contiguous. Differentiable in ``q``, ``k`` and ``v``
        (gradients in their own dtypes); peak extra memory is a few blocks of
        ``_CHUNK_ELEMENTS`` logits plus ``O(N (d + c))``.
    """
    return _ChunkedAttention.apply(q, k, v)


def _padded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax_rows(Q K^T) V`` through the fused SDPA kernels (module docstring); ``(B, N, c)``."""
    # The fused CPU kernels need unit stride in the last axis (NCHW input gives stride N).
    q, k, v = q.contiguous(), k.contiguous(), v.to(q.dtype).contiguous()
    b, n, d = q.shape
    c = v.shape[-1]
    # Zero-padding Q and K up to the head width leaves Q K^T unchanged; F is split into heads of
    # that width that share Q and K (expand() costs no memory). Wide heads mean few heads, and
    # every head recomputes the N x N softmax: with d-wide heads (8 for r = 8) bf16 training on
    # CPU ran 3-6x slower than with one C-wide head (measured at N = 1024 and 3136).
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


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); the probes are private torch API."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported()) or bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001  # pragma: no cover - depends on the torch build
        return False


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


# --- the extractors -----------------------------------------------------------------------------


class SpatialContext(nn.Module):
    """Spatial context extractor: ``X^s = alpha * M F + X`` (see the module docstring).

    Args:
        channels: ``C`` of the input ``(B, C, H, W)``.
        reduction: ``r``; queries and keys have ``max(1, C // r)`` channels.
        qk_activation: ``f`` after the query/key 1 x 1 convolutions: ``"identity"`` or ``"relu"``.
        attention_impl: ``"auto"`` (default), ``"chunked"``, ``"sdpa"`` or ``"naive"``
            (module docstring); same result, different speed and memory.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 8,
        qk_activation: QKActivation = "identity",
        attention_impl: AttentionImpl = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction <= 0:
            raise ValueError(f"reduction must be a positive integer, got {reduction!r}")
        _check_choice("qk_activation", qk_activation, ("identity", "relu"))
        _check_choice("attention_impl", attention_impl, ATTENTION_IMPLS)
        self.channels = channels
        self.qk_channels = max(1, channels // reduction)
        self.attention_impl = attention_impl
        self.query = nn.Conv2d(channels, self.qk_channels, kernel_size=1)
        # The key bias cancels in the row softmax unless f is non-linear (module docstring).
        self.key = nn.Conv2d(channels, self.qk_channels, kernel_size=1, bias=qk_activation == "relu")
        self.activation = nn.ReLU() if qk_activation == "relu" else nn.Identity()
        self.alpha = nn.Parameter(torch.zeros(1))

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Q, K`` ``(B, N, C/r)`` (the convs' dtype under autocast) and ``F`` ``(B, N, C)`` (``x``'s dtype).

        All three are views (no copy) of channels_last tensors; for NCHW input they are
        transposed views, which every implementation accepts.
        """
        q = self.activation(self.query(x)).flatten(2).transpose(1, 2)  # (B, N, d)
        k = self.activation(self.key(x)).flatten(2).transpose(1, 2)  # (B, N, d)
        return q, k, x.flatten(2).transpose(1, 2)

    def resolved_impl(self, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
        """The implementation ``attention_impl`` runs for queries of ``dtype`` on ``device`` (resolves ``"auto"``)."""
        if self.attention_impl != "auto":
            return self.attention_impl
        if device.type != "cpu" or _tracing():
            return "sdpa"
        # The chunked path computes in float32. Where the CPU has bf16 matrix units, the fused
        # kernel runs its products in bf16 instead (not measured here: the development CPU has none).
        if dtype in (torch.bfloat16, torch.float16) and cpu_has_native_bf16():
            return "sdpa"
        return "chunked"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``M F`` ``(B, N, C)`` with ``M = softmax_rows(Q K^T)``, without scale.

        Float32 from ``"chunked"``; the queries' dtype from ``"sdpa"`` and ``"naive"``.
        """
        impl = self.resolved_impl(q.device, q.dtype)
        if impl == "chunked":
            return chunked_attention(q, k, v)
        if impl == "naive":
            m = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)  # (B, N, N)
            return torch.bmm(m, v.to(m.dtype))
        return _padded_sdpa(q, k, v)

    def combine(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``alpha * context + X`` with ``context`` ``(B, N, C)`` reshaped to ``x``'s ``(B, C, H, W)``."""
        b, c, h, w = x.shape
        context = context.transpose(1, 2).reshape(b, c, h, w)  # a view; channels_last when contiguous
        return torch.addcmul(x.float(), self.alpha, context.float()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        q, k, v = self.queries_keys_values(x)
        return self.combine(x, self.attend(q, k, v))


class ChannelContext(nn.Module):
    """Channel context extractor: ``X^c = beta * X' + X`` with ``A = softmax_rows(F^T F)``.

    Args:
        form: ``"slides"`` (default, ``X' = F A``) or ``"danet"`` (``X' = F A^T``); see the
            module docstring.

    No learned projection (``Q = K = F = X``); the only parameter is ``beta``.
    The energies, the softmax and the product run in float32 (module docstring).
    """

    def __init__(self, form: ChannelForm = "slides") -> None:
        super().__init__()
        _check_choice("channel_form", form, CHANNEL_FORMS)
        self.form = form
        self.beta = nn.Parameter(torch.zeros(1))

    @staticmethod
    def energy(x: torch.Tensor) -> torch.Tensor:
        """``E = F^T F`` ``(B, C, C)`` float32 for ``x`` ``(B, C, H, W)`` (symmetric)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            f = x.float().flatten(2)  # (B, C, N); a strided view for channels_last input
            return torch.bmm(f, f.transpose(1, 2))

    @classmethod
    def attention(cls, x: torch.Tensor) -> torch.Tensor:
        """``A = softmax_rows(E)`` ``(B, C, C)`` float32 for ``x`` ``(B, C, H, W)``; rows sum to 1."""
        return torch.softmax(cls.energy(x), dim=-1)

    def mix(self, x: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """``X'`` float32 ``(B, C, H, W)`` in ``x``'s memory format (no layout copy).

        ``X'[c] = sum_d W[c, d] F[d]`` with ``W = A`` (danet) or ``A^T`` (slides). Because ``E``
        is symmetric, ``A^T`` is the softmax of ``E`` over its first axis, so whichever of ``W``
        and ``W^T`` the product needs is computed directly as a contiguous tensor (its
        gradient then needs no layout copy either).
        """
        b, c, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            f = x.float().flatten(2)  # (B, C, N)
            if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
                weights = torch.softmax(energy, dim=2 if self.form == "danet" else 1)  # W
                mixed = torch.bmm(weights, f)  # (B, C, N) contiguous: NCHW
            else:
                # (B, N, C) contiguous is channels_last: F^T W^T, transposed back as a view.
                weights_t = torch.softmax(energy, dim=1 if self.form == "danet" else 2)  # W^T
                mixed = torch.bmm(f.transpose(1, 2), weights_t).transpose(1, 2)
        return mixed.reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``, ``x``'s dtype."""
        return torch.addcmul(x.float(), self.beta, self.mix(x, self.energy(x))).to(x.dtype)


class ContextAggregation(nn.Module):
    """Context aggregation block: ``SpatialContext(X) + ChannelContext(X)``; ``(B, C, H, W)`` in and out.

    A fresh block (``alpha = beta = 0``) returns exactly ``2 X``. The output keeps
    ``x``'s dtype and memory format.

    Args:
        channels: ``C``.
        reduction: query/key reduction ``r`` of the spatial extractor (default 8).
        qk_activation: ``"identity"`` (default) or ``"relu"``.
        channel_form: ``"slides"`` (default) or ``"danet"``.
        attention_impl: ``"auto"`` (default), ``"chunked"``, ``"sdpa"`` or ``"naive"``;
            same result, different speed and memory.

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
        channel_form: ChannelForm = "slides",
        attention_impl: AttentionImpl = "auto",
    ) -> None:
        super().__init__()
        self.spatial = SpatialContext(
            channels, reduction=reduction, qk_activation=qk_activation, attention_impl=attention_impl
        )
        self.channel = ChannelContext(channel_form)

    @property
    def attention_impl(self) -> str:
        return self.spatial.attention_impl

    @attention_impl.setter
    def attention_impl(self, value: str) -> None:
        _check_choice("attention_impl", value, ATTENTION_IMPLS)
        self.spatial.attention_impl = value

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, E, Q, K)``: both extractors with their residuals fused into one sum."""
        b, c, h, w = x.shape
        q, k, v = self.spatial.queries_keys_values(x)
        # One float32 copy of X (none for float32 input) feeds the channel extractor and the
        # chunked spatial product; the fused SDPA kernels take X in the queries' dtype.
        x32 = x.float()
        if self.spatial.resolved_impl(q.device, q.dtype) == "chunked":
            v = x32.flatten(2).transpose(1, 2)
        spatial = self.spatial.attend(q, k, v).transpose(1, 2).reshape(b, c, h, w)  # M F, a view
        energy = self.channel.energy(x32)
        # X^s + X^c = 2 X + alpha M F + beta X', summed in float32 in x's layout (the in-place
        # addcmul_ on the fresh 2 X keeps it), then rounded once to x's dtype.
        out = torch.add(x32, x32).addcmul_(self.spatial.alpha, spatial.float())
        out = out.addcmul_(self.channel.beta, self.channel.mix(x32, energy)).to(x.dtype)
        return out, energy, q, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)[0]

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
        out, energy, q, k = self._forward(x)
        maps: dict[str, torch.Tensor | None] = {
            "channel_attention": torch.softmax(energy.detach(), dim=-1),
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
