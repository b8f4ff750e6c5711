"""Ensembles of checkpoints: member checks, probability averaging over members and flips, list files.

An ensemble is several checkpoints of the same task (seeds, crossval folds, compare runs)
whose sigmoid probabilities are averaged, as nnU-Net averages its folds. This module holds
what both the slice-level evaluation (``hepaseg evaluate --data``) and the whole-volume
predictor (:mod:`hepaseg.inference.ensemble`) need:

* :func:`check_members`: every member must have been trained on the same data options
  (:data:`MEMBER_OPTIONS`: HU window, slice size, context slices, target, liver ROI and
  orientation), since all members read ONE preprocessed input. ``slices`` (which slices
  were kept for training) may differ: it does not change what a network reads.
* :func:`flip_probabilities` and :func:`ensemble_probabilities`: for a batch
  ``x (N, C, H, W)``, each member's probability of every flip (identity; with ``tta`` also
  the horizontal and vertical flips, each undone on the output), their mean over members
  and flips, and the **uncertainty**: the standard deviation over those ``M x F``
  probabilities (population sd, ddof 0).

  Why the standard deviation and not the predictive entropy: the sd measures how much the
  members (and flips) DISAGREE, in probability units (0 = all agree, at most 0.5); it is
  exactly 0 for identical members and large only where the models' answers differ, which is
  what "how sure is the ensemble" should mean for a reader. The predictive entropy
  ``H(p_mean)`` is high wherever the mean probability is near 0.5 even when every member says
  0.5 (a lesion's boundary is always "uncertain" by that measure), so it mixes the blur of the
  boundary with disagreement. One member without ``--tta`` has no spread: its sd is 0
  everywhere.
* Ensemble list files (:func:`write_ensemble_list`, :func:`read_ensemble_list`): JSON written
  by ``hepaseg compare`` and ``hepaseg crossval`` and read by ``--checkpoints-from FILE``::

      {"format": "hepaseg-ensemble/1", "model": "mfcnet", "source": "crossval",
       "checkpoints": ["folds/a/mfcnet/seed0/last.ckpt", ...],      # relative to the file's folder
       "liver_checkpoints": ["folds/a/liver-unet/seed0/last.ckpt", ...],   # cascade only
       "note": "..."}
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hepaseg.errors import HepasegError
from hepaseg.io.atomic import write_json_atomic

__all__ = [
    "ENSEMBLE_FORMAT",
    "MAX_MEMBERS",
    "MEMBER_OPTIONS",
    "BatchProbabilities",
    "EnsembleList",
    "check_members",
    "ensemble_name",
    "ensemble_probabilities",
    "flip_probabilities",
    "read_ensemble_list",
    "resolve_members",
    "write_ensemble_list",
]

ENSEMBLE_FORMAT = "hepaseg-ensemble/1"
#: Data options every member of an ensemble must share (they all read one preprocessed input).
MEMBER_OPTIONS = ("window", "size", "context_slices", "target", "roi", "roi_margin_mm", "orientation")
#: Members are counted per voxel in a bit field (one bit each) for the lesion-level agreement.
MAX_MEMBERS = 64
# Identity, horizontal (x, last axis) and vertical (y) flips; each flip is its own inverse.
_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,))


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "window" and a is not None and b is not None:
        return [float(v) for v in a] == [float(v) for v in b]
    if key == "target":  # older checkpoints without a target are tumour checkpoints
        return (a or "tumor") == (b or "tumor")
    return a == b


def ensemble_name(names: Sequence[str]) -> str:
    """``"mfcnet"`` for one member, ``"mfcnet x3"`` for three of one network, ``"mfcnet+unet"`` for mixed ones."""
    unique = list(dict.fromkeys(names))
    if len(names) == 1:
        return names[0]
    return f"{unique[0]} x{len(names)}" if len(unique) == 1 else "+".join(unique)


def check_members(options: Sequence[Mapping[str, Any]], sources: Sequence[str], *,
                  option: str = "--checkpoint") -> None:
    """Refuse an ensemble whose members were trained on different data options.

    Args:
        options: each member's ``data_options`` (checkpoint or ONNX metadata).
        sources: each member's file, for the message.
        option: the command-line option the members came from.

    Raises:
        HepasegError: the first option of :data:`MEMBER_OPTIONS` in which a member differs
            from the first member (one line naming both files); more than :data:`MAX_MEMBERS`.
    """
    if len(options) > MAX_MEMBERS:
        raise HepasegError(f"{option}: {len(options)} checkpoints: expected at most {MAX_MEMBERS} ensemble members")
    first = options[0]
    for other, source in zip(options[1:], sources[1:]):
        for key in MEMBER_OPTIONS:
            if not _same(key, first.get(key), other.get(key)):
                raise HepasegError(
                    f"{option} {source}: data option {key} is {other.get(key)!r}: expected {first.get(key)!r} as in "
                    f"{option} {sources[0]}: ensemble members must be trained on the same prepared data options "
                    f"({', '.join(MEMBER_OPTIONS)}). Ensemble checkpoints of one dataset, or predict separately"
                )


def flip_probabilities(
    model: torch.nn.Module | Callable,
    x: torch.Tensor,
    *,
    tta: bool = False,
    autocast: contextlib.AbstractContextManager | None = None,
) -> list[torch.Tensor]:
    """Sigmoid probabilities of one network for ``x (N, C, H, W)``: one float32 ``(N, H, W)`` per flip.

    Without ``tta`` only the identity; with it also the horizontal and vertical flips, each
    flipped back so that every tensor is aligned with ``x``.

    Raises:
        HepasegError: the model does not return ``(N, 1, H, W)`` logits.
    """
    out = []
    for dims in _FLIPS if tta else _FLIPS[:1]:
        xi = torch.flip(x, dims) if dims else x
        with autocast if autocast is not None else contextlib.nullcontext():
            logits = model(xi)
        if isinstance(logits, np.ndarray):  # an ONNX engine
            logits = torch.from_numpy(logits)
        if logits.dim() != 4 or logits.shape[1] != 1:
            raise HepasegError(
                f"model output has shape {tuple(logits.shape)}: expected (N, 1, H, W) tumour logits. "
                "Use a checkpoint trained with target 'tumor' (num_classes=1)"
            )
        prob = torch.sigmoid(logits[:, 0].float())
        out.append(torch.flip(prob, dims) if dims else prob)
    return out


@dataclass
class BatchProbabilities:
    """What :func:`ensemble_probabilities` returns for a batch of ``N`` slices of ``H x W`` pixels.

    ``mean``: float32 ``(N, H, W)``, the mean over members of each member's flip mean (= the mean
    over all ``M x F`` probabilities). ``members``: float32 ``(N, M, H, W)``, each member's flip
    mean. ``std``: float32 ``(N, H, W)`` sd over the ``M x F`` probabilities, or None when not asked.
    """

    mean: torch.Tensor
    members: torch.Tensor
    std: torch.Tensor | None = None


def ensemble_probabilities(
    models: Sequence[torch.nn.Module | Callable],
    x: torch.Tensor,
    *,
    tta: bool = False,
    autocast: contextlib.AbstractContextManager | None = None,
    with_std: bool = False,
) -> BatchProbabilities:
    """Average the sigmoid probabilities of ``models`` (and flips) for one batch ``x (N, C, H, W)``.

    Sums run member by member and flip by flip in a fixed order, so one member gives exactly
    the probabilities of :func:`hepaseg.inference.predict_volume` (same operations). The sd is
    computed in two passes (mean, then squared deviations), so identical members give exactly 0
    without ``tta``.
    """
    if not models:
        raise ValueError("models: expected at least one network")
    per_member = [flip_probabilities(m, x, tta=tta, autocast=autocast) for m in models]
    member_means = []
    for flips in per_member:
        total = flips[0]
        for prob in flips[1:]:
            total = total + prob
        member_means.append(total / len(flips))
    mean = member_means[0]
    for prob in member_means[1:]:
        mean = mean + prob
    mean = mean / len(member_means)
    std = None
    if with_std:
        squares = torch.zeros_like(mean)
        for flips in per_member:
            for prob in flips:
                squares += (prob - mean) ** 2
        std = torch.sqrt(squares / (len(per_member) * len(per_member[0])))
    return BatchProbabilities(mean=mean, members=torch.stack(member_means, dim=1), std=std)


# --- ensemble list files ------------------------------------------------------------------------


@dataclass
class EnsembleList:
    """A parsed ensemble list file: absolute checkpoint paths (tumour stage, and the liver stage)."""

    path: Path
    checkpoints: list[Path]
    liver_checkpoints: list[Path] = field(default_factory=list)
    model: str | None = None
    source: str | None = None


def _relative(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), folder.resolve())
    except ValueError:  # another drive (Windows): keep it absolute
        return str(Path(path).resolve())


def write_ensemble_list(
    path: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    *,
    liver_checkpoints: Sequence[str | os.PathLike] = (),
    model: str | None = None,
    source: str | None = None,
    note: str | None = None,
) -> Path:
    """Write an ensemble list file (module docstring); paths are stored relative to its folder.

    Returns:
        ``Path(path)`` (written atomically).
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    content: dict[str, Any] = {
        "format": ENSEMBLE_FORMAT,
        "model": model,
        "source": source,
        "checkpoints": [_relative(Path(c), folder) for c in checkpoints],
    }
    if liver_checkpoints:
        content["liver_checkpoints"] = [_relative(Path(c), folder) for c in liver_checkpoints]
    if note:
        content["note"] = note
    return write_json_atomic(path, content)


def read_ensemble_list(path: str | os.PathLike) -> EnsembleList:
    """Read an ensemble list file; relative paths are resolved against the file's folder.

    Raises:
        HepasegError: missing file, not JSON, another format, or no checkpoint listed.
    """
    path = Path(path)
    where = f"--checkpoints-from {path}"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HepasegError(f"{where}: file not found: expected an ensemble list written by `hepaseg compare` or "
                           "`hepaseg crossval` (OUT/ensembles/<model>.json)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HepasegError(f"{where}: not a JSON ensemble list ({exc}): expected {ENSEMBLE_FORMAT!r} JSON") from None
    if not isinstance(data, dict) or data.get("format") != ENSEMBLE_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise HepasegError(f"{where}: format: expected {ENSEMBLE_FORMAT!r}, got {got!r}. Give the "
                           "OUT/ensembles/<model>.json of `hepaseg compare` or `hepaseg crossval`")

    def paths(key: str) -> list[Path]:
        values = data.get(key) or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise HepasegError(f"{where}: {key}: expected a list of checkpoint paths, got {values!r}")
        return [Path(v) if Path(v).is_absolute() else path.parent / v for v in values]

    checkpoints = paths("checkpoints")
    if not checkpoints:
        raise HepasegError(f"{where}: checkpoints: expected at least one checkpoint, got none")
    return EnsembleList(path=path, checkpoints=checkpoints, liver_checkpoints=paths("liver_checkpoints"),
                        model=data.get("model"), source=data.get("source"))


def resolve_members(
    checkpoints: Sequence[str | os.PathLike] | None,
    checkpoints_from: str | os.PathLike | None = None,
    liver_checkpoints: Sequence[str | os.PathLike] | None = None,
) -> tuple[list[Path], list[Path]]:
    """The tumour and liver members of ``--checkpoint`` (repeatable), ``--checkpoints-from FILE`` and
    ``--liver-checkpoint`` (repeatable).

    The file's checkpoints come after the ``--checkpoint`` ones; its liver checkpoints are used
    when no ``--liver-checkpoint`` is given (a crossval cascade's list carries both stages).
    """
    tumor = [Path(c) for c in checkpoints or []]
    liver = [Path(c) for c in liver_checkpoints or []]
    if checkpoints_from is not None:
        listed = read_ensemble_list(checkpoints_from)
        tumor += listed.checkpoints
        if not liver:
            liver = list(listed.liver_checkpoints)
    return tumor, liver
