"""Whole-volume prediction: slice batches in, a tumour mask at the CT's own resolution out.

The networks are 2D (with ``2K + 1`` context slices as channels), so a volume is
predicted slice by slice in batches. Each slice is preprocessed exactly as in
training (:mod:`hepaseg.inference.preprocess`), the sigmoid probabilities are
resized back to the original ``(y, x)`` bilinearly and only then thresholded, so
the mask has the input's shape and geometry. Resizing probabilities rather than
logits keeps test-time augmentation an average of probabilities, and rounding
happens once, at full resolution.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from hepaseg.errors import HepasegError
from hepaseg.evaluation.ensemble import flip_probabilities
from hepaseg.inference.preprocess import DataOptions, parse_data_options, preprocess_slices, resize_slices

__all__ = ["check_volume_for_model", "model_in_channels", "predict_volume", "resolve_device"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_in_channels(model: nn.Module | Callable) -> int | None:
    """Input channels a model declares (``in_channels`` attribute, or its first conv), if any."""
    value = getattr(model, "in_channels", None)
    if isinstance(value, int):
        return value
    if isinstance(model, nn.Module):
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                return module.in_channels
    return None


def check_volume_for_model(
    image: np.ndarray, data_options: Mapping, *, model: nn.Module | Callable | None = None, source: str = "input"
) -> DataOptions:
    """Check that a ``(z, y, x)`` image can be fed to a model trained with ``data_options``.

    Raises:
        HepasegError: the image is not 3D, has fewer than ``max(2, 2K + 1)`` slices, or the
            model's input channels differ from ``2K + 1``.
    """
    opts = parse_data_options(data_options, source=f"{source}: data options")
    if image.ndim != 3:
        raise HepasegError(
            f"{source}: expected a 3D CT volume (z, y, x), got an array of shape {tuple(image.shape)}. "
            "Pass the whole scan, not a single slice"
        )
    z = image.shape[0]
    needed = max(2, opts.in_channels)
    if z < needed:
        raise HepasegError(
            f"{source}: has {z} axial slice(s), but the model reads {opts.in_channels} "
            f"(context_slices={opts.context_slices}): expected a CT volume with at least {needed} slices. "
            "Pass the whole scan, not a single slice"
        )
    if model is not None:
        channels = model_in_channels(model)
        if channels is not None and channels != opts.in_channels:
            raise HepasegError(
                f"{source}: model reads {channels} channels, but its data options give "
                f"2 * context_slices + 1 = {opts.in_channels}: the checkpoint/ONNX file is inconsistent. "
                "Re-export it from the training checkpoint"
            )
    return opts


def _autocast(device: torch.device, precision: str, is_torch: bool) -> tuple[contextlib.AbstractContextManager, str]:
    """The autocast context for ``precision`` on ``device`` and the precision actually used."""
    if not is_torch or precision == "fp32":
        return contextlib.nullcontext(), "fp32"
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and _cpu_has_native_bf16():
            precision = "bf16"
        else:
            return contextlib.nullcontext(), "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    try:
        return torch.autocast(device_type=device.type, dtype=dtype), precision
    except RuntimeError:  # autocast unsupported for this device/dtype: stay in fp32
        return contextlib.nullcontext(), "fp32"


def _cpu_has_native_bf16() -> bool:
    # Only worth it with native bf16 instructions; emulated bf16 is slower than fp32.
    # The probe is private API, so any failure means "no".
    try:
        return bool(torch.cpu._is_avx512_bf16_supported()) or bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001  # pragma: no cover - depends on the torch build
        return False


def _probabilities(
    model: nn.Module | Callable, x: torch.Tensor, *, tta: bool, autocast: contextlib.AbstractContextManager
) -> torch.Tensor:
    """Sigmoid probabilities ``(N, H, W)`` float32 for ``x (N, C, H, W)``; TTA averages 3 flips."""
    flips = flip_probabilities(model, x, tta=tta, autocast=autocast)  # identity, then x and y flips
    total = flips[0]
    for prob in flips[1:]:
        total = total + prob
    return total / len(flips)


def batch_input(image: np.ndarray, centres: np.ndarray, opts, dev: torch.device, *, is_torch: bool,
                pad_to: int = 0) -> torch.Tensor:
    """The network input of slices ``centres``: ``(max(k, pad_to), 2K+1, S, S)`` float32 on ``dev``.

    A batch shorter than ``pad_to`` is zero-padded to it (a compiled graph has a fixed batch; the
    caller drops the padding's outputs); on CPU a torch network gets NHWC (faster oneDNN convolutions).
    """
    x = preprocess_slices(image, centres, opts).to(dev)  # (k, 2K+1, S, S)
    if len(centres) < pad_to:
        x = torch.cat([x, x.new_zeros(pad_to - len(centres), *x.shape[1:])])
    if is_torch and dev.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def predict_volume(
    model: nn.Module | Callable,
    volume,
    data_options: Mapping,
    *,
    batch: int = 8,
    tta: bool = False,
    threshold: float | None = 0.5,
    device: str | torch.device | None = None,
    precision: str = "auto",
    progress: bool = True,
    compile: bool = False,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Predict the tumour in every axial slice of a CT volume.

    Args:
        model: network mapping ``(N, 2K+1, S, S)`` float32 in ``[0, 1]`` to logits
            ``(N, 1, S, S)``; an ``nn.Module`` (moved to ``device``, set to eval mode and,
            on CPU, to channels_last -- in place) or any callable such as
            :class:`hepaseg.inference.onnx_engine.OnnxModel` (run as given, on CPU tensors).
        volume: a :class:`hepaseg.io.Volume` or a ``(z, y, x)`` array, in HU.
        data_options: ``window`` (HU), ``size`` (pixels), ``context_slices`` K, as stored in the
            checkpoint; preprocessing repeats ``hepaseg prepare`` exactly.
        batch: slices per forward pass (default 8; >= 1). Results do not depend on it.
        tta: average the sigmoid probabilities of the identity, horizontal and vertical flips.
        threshold: probability above which a voxel is tumour (default 0.5, strictly greater);
            ``None`` returns the probabilities instead.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        precision: ``"auto"`` (default: bf16 autocast on CUDA, and on CPUs with native bf16;
            else fp32), ``"fp32"``, ``"bf16"`` or ``"fp16"``. Ignored for non-torch models.
        progress: show a rich progress bar over slices (on stderr).
        compile: ``torch.compile`` an ``nn.Module`` (in place) before the first batch. The first
            batch then pays the compilation; a short last batch is padded with zeros to the full
            batch so that it reuses the compiled graph instead of compiling a second one.
        timings: if given, ``timings["first_batch"]`` is set to the seconds of the first batch
            (preprocessing + network; with ``compile`` the compilation is in it).

    Returns:
        ``(z, y, x)`` at the volume's original resolution: uint8 {0, 1} mask, or float32
        probabilities in ``[0, 1]`` when ``threshold`` is None.

    Raises:
        HepasegError: the volume is not 3D, is too thin for the context window, or the model's
            channels do not match ``data_options``.
    """
    image = np.asarray(getattr(volume, "image", volume))
    source = getattr(volume, "source", "") or getattr(volume, "case_id", "") or "input"
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] or None, got {threshold!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    opts = check_volume_for_model(image, data_options, model=model, source=source)

    is_torch = isinstance(model, nn.Module)
    dev = resolve_device(device) if is_torch else torch.device("cpu")
    if is_torch:
        model.eval()
        model.to(dev)
        if dev.type == "cpu":
            # oneDNN convolutions are faster in NHWC; results are the same up to rounding.
            model.to(memory_format=torch.channels_last)
        if compile:
            model.compile()
    autocast, _ = _autocast(dev, precision, is_torch)
    pad_to = batch if compile and is_torch else 0

    z, h, w = image.shape
    out = np.empty((z, h, w), dtype=np.float32 if threshold is None else np.uint8)
    bar = _progress(progress, z)
    with bar or contextlib.nullcontext(), torch.inference_mode():
        task = bar.add_task("predicting slices", total=z) if bar else None
        for start in range(0, z, batch):
            t0 = time.perf_counter()
            centres = np.arange(start, min(start + batch, z))
            n = len(centres)
            x = batch_input(image, centres, opts, dev, is_torch=is_torch, pad_to=pad_to)
            prob = _probabilities(model, x, tta=tta, autocast=autocast)[:n]  # (n, S, S)
            prob = resize_slices(prob, (h, w)).clamp_(0.0, 1.0)  # (n, y, x) at original size
            if threshold is None:
                out[centres] = prob.cpu().numpy()
            else:
                out[centres] = (prob > float(threshold)).cpu().numpy()
            if bar:
                bar.advance(task, len(centres))
            if timings is not None and start == 0:
                timings["first_batch"] = time.perf_counter() - t0
    return out


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
