"""Whole-volume prediction by an ensemble of checkpoints: mean probability, uncertainty, member votes.

``hepaseg predict``, ``evaluate --volumes`` and the cascade accept ``--checkpoint`` several times
(seeds, crossval folds, compare runs); :func:`load_ensemble` loads them and refuses members
trained on different data options (:func:`hepaseg.evaluation.ensemble.check_members`), and
:func:`predict_ensemble` predicts a ``(z, y, x)`` volume slice batch by slice batch, exactly as
:func:`hepaseg.inference.predict_volume` does for one network (same preprocessing, same
resize of probabilities back to the scan's resolution; one member gives the same
probabilities bit for bit), and returns:

* ``probability``: the mean over members and flips (``tta``) of the sigmoid probabilities,
  resized to the scan's ``(y, x)``; the mask is ``probability > threshold``;
* ``uncertainty`` (asked with ``uncertainty=True``): the standard deviation over the
  ``members x flips`` probabilities (why the sd and not the entropy: see
  :mod:`hepaseg.evaluation.ensemble`), computed at the network's resolution and resized
  bilinearly like the probabilities; 0 everywhere for one member without ``tta``;
* ``votes`` (``votes=True``): a per-voxel bit field, bit ``m`` set where member ``m``'s own
  flip-averaged probability is ``> threshold`` (uint8 up to 8 members, up to 64 in wider
  integers), from which the lesion table counts how many members predict each lesion.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hepaseg.errors import HepasegError
from hepaseg.evaluation.ensemble import (
    MAX_MEMBERS,
    BatchProbabilities,
    check_members,
    ensemble_name,
    ensemble_probabilities,
)
from hepaseg.inference.predictor import (
    PRECISIONS,
    _autocast,
    _progress,
    batch_input,
    check_volume_for_model,
    resolve_device,
)
from hepaseg.inference.preprocess import resize_slices

__all__ = ["Ensemble", "EnsemblePrediction", "as_model_list", "load_ensemble", "predict_ensemble", "vote_dtype"]


@dataclass
class Ensemble:
    """Networks loaded from checkpoints that share their data options (:func:`load_ensemble`)."""

    models: list[nn.Module]
    data_options: dict[str, Any]  # the first member's (all members share MEMBER_OPTIONS)
    names: list[str]  # registry name of each member
    sources: list[str]  # checkpoint path of each member
    model_options: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.models)

    @property
    def model_name(self) -> str:
        """``"mfcnet"``, or ``"mfcnet x3"`` for three members, ``"mfcnet+unet"`` for mixed ones."""
        return ensemble_name(self.names)


def load_ensemble(checkpoints: Sequence[str | os.PathLike], *, option: str = "--checkpoint") -> Ensemble:
    """Load every checkpoint (weights only) and check that they can be averaged.

    Raises:
        HepasegError: no checkpoint, an unreadable one, or members with different data options.
    """
    from hepaseg.training import load_checkpoint  # training sits below inference

    if not checkpoints:
        raise HepasegError(f"{option}: expected at least one checkpoint from `hepaseg train`, got none")
    loaded = [load_checkpoint(c) for c in checkpoints]
    sources = [str(c) for c in checkpoints]
    check_members([m.data_options for m in loaded], sources, option=option)
    return Ensemble(models=[m.model for m in loaded], data_options=dict(loaded[0].data_options),
                    names=[m.model_name for m in loaded], sources=sources,
                    model_options=[dict(m.model_options) for m in loaded])


def as_model_list(models: nn.Module | Callable | Sequence) -> list:
    """One network or a sequence of them (or an :class:`Ensemble`) as a list."""
    if isinstance(models, Ensemble):
        return list(models.models)
    if isinstance(models, (list, tuple)):
        return list(models)
    return [models]


def vote_dtype(n_members: int) -> np.dtype:
    """The smallest unsigned integer with one bit per member."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if n_members <= np.iinfo(dtype).bits:
            return np.dtype(dtype)
    raise HepasegError(f"--checkpoint: {n_members} members: expected at most {MAX_MEMBERS}")


@dataclass
class EnsemblePrediction:
    """What :func:`predict_ensemble` returns; arrays are ``(z, y, x)`` at the volume's resolution.

    ``probability`` float32 in [0, 1]; ``uncertainty`` float32 in [0, 0.5] or None;
    ``votes`` unsigned ints (bit m = member m predicts the voxel) or None.
    """

    probability: np.ndarray
    n_members: int
    tta: bool
    uncertainty: np.ndarray | None = None
    votes: np.ndarray | None = None

    def mask(self, threshold: float) -> np.ndarray:
        """uint8 {0, 1}: ``probability > threshold``."""
        return (self.probability > float(threshold)).astype(np.uint8)


def predict_ensemble(
    models: nn.Module | Callable | Sequence,
    volume,
    data_options: dict[str, Any],
    *,
    batch: int = 8,
    tta: bool = False,
    device: str | torch.device | None = None,
    precision: str = "auto",
    progress: bool = True,
    uncertainty: bool = False,
    votes: bool = False,
    threshold: float = 0.5,
    compile: bool = False,
    timings: dict[str, float] | None = None,
) -> EnsemblePrediction:
    """Predict every axial slice of a CT volume with one network or an ensemble (module docstring).

    Args:
        models: a network, a list of networks or an :class:`Ensemble`; each maps
            ``(N, 2K+1, S, S)`` float32 in [0, 1] to logits ``(N, 1, S, S)``. ``nn.Module`` members
            are moved to ``device`` and set to eval mode (in place); other callables (ONNX) run
            on CPU tensors.
        volume: a :class:`hepaseg.io.Volume` or a ``(z, y, x)`` array, in HU.
        data_options: ``window`` (HU), ``size`` (pixels), ``context_slices`` K, shared by all members.
        batch: slices per forward pass (>= 1); results do not depend on it.
        tta: average over the identity, horizontal and vertical flips too.
        device, precision, progress: as :func:`hepaseg.inference.predict_volume`.
        uncertainty: also return the sd over members and flips.
        votes: also return the per-member bit field at ``threshold``.
        threshold: the members' threshold for ``votes`` (strictly greater), in [0, 1].
        compile: ``torch.compile`` each ``nn.Module`` member (in place) before the first batch, as
            :func:`hepaseg.inference.predict_volume` does (a short last batch is zero-padded to the
            full batch so that it reuses the compiled graph; the padding's outputs are dropped).
        timings: if given, ``timings["first_batch"]`` is set to the seconds of the first batch
            (with ``compile`` the compilation is in it).

    Returns:
        :class:`EnsemblePrediction`.

    Raises:
        HepasegError: a volume the members cannot read (see ``check_volume_for_model``).
    """
    members = as_model_list(models)
    if not members:
        raise ValueError("models: expected at least one network")
    image = np.asarray(getattr(volume, "image", volume))
    source = getattr(volume, "source", "") or getattr(volume, "case_id", "") or "input"
    opts = _check_inputs(members, image, data_options, batch=batch, precision=precision, threshold=threshold,
                         source=source)
    is_torch = all(isinstance(m, nn.Module) for m in members)
    dev = resolve_device(device) if is_torch else torch.device("cpu")
    if is_torch:
        _prepare_members(members, dev, compile=compile)
    autocast, _ = _autocast(dev, precision, is_torch)
    pad_to = batch if compile and is_torch else 0

    z, h, w = image.shape
    n = len(members)
    probability = np.empty((z, h, w), dtype=np.float32)
    spread = np.empty((z, h, w), dtype=np.float32) if uncertainty else None
    bits = np.zeros((z, h, w), dtype=vote_dtype(n)) if votes else None
    bar = _progress(progress, z)
    with bar or contextlib.nullcontext(), torch.inference_mode():
        task = bar.add_task(f"predicting slices ({n} member{'s' if n > 1 else ''})", total=z) if bar else None
        for start in range(0, z, batch):
            t0 = time.perf_counter()
            centres = np.arange(start, min(start + batch, z))
            out = _forward(members, image, centres, opts, dev, is_torch=is_torch, pad_to=pad_to, tta=tta,
                           autocast=autocast, uncertainty=uncertainty)
            probability[centres] = resize_slices(out.mean, (h, w)).clamp_(0.0, 1.0).cpu().numpy()
            if spread is not None:
                spread[centres] = resize_slices(out.std, (h, w)).clamp_(0.0, 0.5).cpu().numpy()
            if bits is not None:
                _add_votes(bits, centres, out.members, float(threshold))
            if bar:
                bar.advance(task, len(centres))
            if timings is not None and start == 0:
                timings["first_batch"] = time.perf_counter() - t0
    return EnsemblePrediction(probability=probability, n_members=n, tta=bool(tta), uncertainty=spread, votes=bits)


def _check_inputs(members: list, image: np.ndarray, data_options: dict[str, Any], *, batch: int, precision: str,
                  threshold: float, source: str):
    """The data options every member reads ``image`` with; ValueError for a bad argument (a caller's bug)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    opts = None
    for member in members:
        opts = check_volume_for_model(image, data_options, model=member, source=source)
    assert opts is not None
    return opts


def _prepare_members(members: list[nn.Module], dev: torch.device, *, compile: bool) -> None:
    """Eval mode on ``dev`` (channels-last on CPU), compiled when asked; in place."""
    for member in members:
        member.eval()
        member.to(dev)
        if dev.type == "cpu":
            member.to(memory_format=torch.channels_last)  # oneDNN convolutions are faster in NHWC
        if compile:
            member.compile()


def _forward(members: list, image: np.ndarray, centres: np.ndarray, opts, dev: torch.device, *, is_torch: bool,
             pad_to: int, tta: bool, autocast, uncertainty: bool) -> BatchProbabilities:
    """Probabilities of the slices ``centres`` of ``image`` at the network's size: mean ``(k, S, S)``, members
    ``(k, M, S, S)``, std ``(k, S, S)`` or None.

    A batch shorter than ``pad_to`` is zero-padded to it and the padding's outputs are dropped.
    """
    k = len(centres)
    x = batch_input(image, centres, opts, dev, is_torch=is_torch, pad_to=pad_to)
    out = ensemble_probabilities(members, x, tta=tta, autocast=autocast, with_std=uncertainty)
    if k < len(x):
        out = BatchProbabilities(mean=out.mean[:k], members=out.members[:k],
                                 std=None if out.std is None else out.std[:k])
    return out


def _add_votes(bits: np.ndarray, centres: np.ndarray, members: torch.Tensor, threshold: float) -> None:
    """Set bit ``m`` of ``bits[centres]`` where member ``m``'s probability (resized to the scan) is > ``threshold``."""
    h, w = bits.shape[1:]
    each = resize_slices(members, (h, w)).clamp_(0.0, 1.0).cpu().numpy()  # (n, M, y, x)
    for m in range(each.shape[1]):
        bits[centres] |= (each[:, m] > threshold).astype(bits.dtype) << bits.dtype.type(m)
