"""Slice preprocessing for inference, identical to what ``hepaseg prepare`` stores.

The steps themselves live in :mod:`hepaseg.data.prepare` (one source of truth):
:func:`~hepaseg.data.prepare.preprocess_image` clips to the HU window, scales to
``[0, 1]`` and resizes each slice to ``size x size`` (bilinear,
``align_corners=False``, antialiased when downsampling), and
:func:`~hepaseg.data.prepare.stack_context` gathers ``2K + 1`` neighbouring slices
as channels with the border slice repeated. Prepare stores the result as
float16, so inference rounds through float16 too: the network sees bit-for-bit
the inputs it was trained on. This module adds checked data options and the
resize back to the original in-plane size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hepaseg.data.prepare import preprocess_image, stack_context
from hepaseg.errors import HepasegError

__all__ = [
    "DataOptions",
    "parse_data_options",
    "preprocess_slices",
    "resize_slices",
]


class DataOptions(dict):
    """The preprocessing a checkpoint was trained with (a dict, as stored in checkpoints).

    Keys: ``window`` ``[lo, hi]`` in HU, ``size`` (pixels, int), ``context_slices`` (K >= 0),
    and optionally ``target`` (``"tumor"``) and ``slices``.
    """

    @property
    def window(self) -> tuple[float, float]:
        return float(self["window"][0]), float(self["window"][1])

    @property
    def size(self) -> int:
        return int(self["size"])

    @property
    def context_slices(self) -> int:
        return int(self["context_slices"])

    @property
    def in_channels(self) -> int:
        """Channels the network reads: ``2K + 1``."""
        return 2 * self.context_slices + 1


def parse_data_options(options: Mapping, *, source: str = "data_options") -> DataOptions:
    """Validate a checkpoint's ``data_options`` and return them as :class:`DataOptions`.

    Raises:
        HepasegError: naming ``source`` when a key is missing or a value is out of range.
    """
    if not isinstance(options, Mapping):
        raise HepasegError(f"{source}: expected a mapping of data options, got {type(options).__name__}")
    missing = [k for k in ("window", "size", "context_slices") if k not in options]
    if missing:
        raise HepasegError(
            f"{source}: data options lack {', '.join(missing)}: expected window, size and context_slices. "
            "Re-train or re-export with a current hepaseg"
        )
    window = options["window"]
    if not isinstance(window, Sequence) or len(window) != 2 or not float(window[0]) < float(window[1]):
        raise HepasegError(f"{source}: window must be [lo, hi] in HU with lo < hi, got {window!r}")
    size, k = options["size"], options["context_slices"]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise HepasegError(f"{source}: size must be a positive integer (pixels), got {size!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise HepasegError(f"{source}: context_slices must be an integer >= 0, got {k!r}")
    return DataOptions(dict(options))


def resize_slices(slices: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear in-plane resize of a stack of 2D images (used to map probabilities back).

    Args:
        slices: ``(n, H, W)`` or ``(n, C, H, W)`` float tensor.
        size: target ``S`` (square ``S x S``) or ``(H', W')`` in pixels.

    Returns:
        ``(n, H', W')`` or ``(n, C, H', W')``; the input itself when already that size.
    """
    out_hw = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if tuple(slices.shape[-2:]) == out_hw:
        return slices
    squeeze = slices.dim() == 3
    x = slices[:, None] if squeeze else slices
    # align_corners=False: pixel areas (not centres) line up, the same convention prepare used on
    # the way in, so a resize there and back lands every pixel where it started.
    y = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
    return y[:, 0] if squeeze else y


def preprocess_slices(
    image: np.ndarray, centres: Sequence[int] | np.ndarray, data_options: Mapping
) -> torch.Tensor:
    """Network input for the axial slices ``centres`` of one volume, as prepare makes it.

    Args:
        image: ``(z, y, x)`` CT in HU.
        centres: slice indices to predict.
        data_options: ``window``, ``size``, ``context_slices`` (see :class:`DataOptions`).

    Returns:
        float32 tensor ``(len(centres), 2K + 1, size, size)`` in ``[0, 1]`` (values
        representable in float16, as in the prepared shards).
    """
    opts = data_options if isinstance(data_options, DataOptions) else parse_data_options(data_options)
    centres = np.asarray(centres, dtype=np.int64)
    k = opts.context_slices
    offsets = np.arange(-k, k + 1)
    # Preprocess only the slices this batch needs (each once), as prepare does, then gather the context.
    needed = np.unique(np.clip(centres[:, None] + offsets[None, :], 0, image.shape[0] - 1))
    pre = preprocess_image(image[needed], window=opts.window, size=opts.size)  # (m, S, S) float32
    local = np.searchsorted(needed, centres)  # rows of ``pre`` holding the centres
    # stack_context clips at the ends of ``pre``; that equals clipping at the volume's ends because
    # ``needed`` holds every (clipped) neighbour of every centre.
    stacked = stack_context(pre, local, k)  # (n, 2K+1, S, S)
    # Prepared shards are float16: round the same way so inputs match training bit for bit.
    return torch.from_numpy(stacked.astype(np.float16).astype(np.float32))
