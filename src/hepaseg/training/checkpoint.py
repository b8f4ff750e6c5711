"""Checkpoint format: atomic writing and a weights-only loader that rebuilds the network.

A hepaseg checkpoint is a Lightning checkpoint (``state_dict`` with keys
``net.<param>``, optimizer/scheduler/loop states for ``--resume``) plus::

    checkpoint["hepaseg"] = {
        "version": "0.1.0",                 # hepaseg that wrote it
        "model": "mfcnet", "model_options": {...},
        "in_channels": 3, "num_classes": 1, "base_width": 64,
        "data_options": {"window": [lo, hi], "size": 224, "context_slices": 1, "slices": ..., "target": "tumor"},
        "metrics": {"val_dice": 0.61, "epoch": 12, "step": 3900},
        "config": {...},                    # TrainConfig.to_dict()
    }

Everything in it is a tensor or plain Python (dict/list/str/float/int/bool/None),
so it loads with ``torch.load(path, weights_only=True)``, which cannot run code
from a file. Writes go to a temporary file beside the destination and are
renamed into place (:func:`hepaseg.io.atomic.atomic_path`): a killed run leaves
the previous checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from hepaseg.errors import HepasegError
from hepaseg.io.atomic import atomic_path

__all__ = ["AtomicCheckpointIO", "LoadedModel", "load_checkpoint", "read_checkpoint"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint writer: ``torch.save`` to a temp file in the same directory, then rename.

    (Lightning's own writer stages the file in the system temp dir and moves it,
    which is a non-atomic copy when that dir is another file system.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


@dataclass
class LoadedModel:
    """A network rebuilt from a checkpoint (see :func:`load_checkpoint`)."""

    model: nn.Module  # the network only, weights loaded, in eval mode
    model_name: str
    model_options: dict[str, Any]
    data_options: dict[str, Any]  # window, size, context_slices, slices, target
    metrics: dict[str, Any]  # val_dice, epoch, step when it was saved
    version: str  # hepaseg version that wrote it
    config: dict[str, Any] = field(default_factory=dict)  # resolved TrainConfig as a dict
    in_channels: int = 1
    num_classes: int = 1
    base_width: int = 64


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict, loaded with ``weights_only=True``; raises HepasegError when the file is
    missing, truncated/corrupt, or not a hepaseg checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise HepasegError(f"{path}: checkpoint not found: expected a .ckpt written by `hepaseg train` "
                           "(RUN/best.ckpt or RUN/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise HepasegError(f"{path}: cannot read checkpoint (truncated or corrupt?): {_first_line(exc)}. "
                               "Use another checkpoint of the run, e.g. best.ckpt instead of last.ckpt") from None
        # torch's own advice (re-run with weights_only=False) would let the file run code: not ours to give.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise HepasegError(
            f"{path}: checkpoint holds non-tensor Python objects{what}: expected only tensors and plain values, as "
            "`hepaseg train` writes. hepaseg loads checkpoints weights-only and will not unpickle such objects "
            "(unpickling can run code from the file). Use a checkpoint written by `hepaseg train`"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise HepasegError(f"{path}: cannot read checkpoint (truncated or corrupt?): {_first_line(exc)}. "
                           "Use another checkpoint of the run, e.g. best.ckpt instead of last.ckpt") from None
    if not isinstance(checkpoint, dict) or "hepaseg" not in checkpoint or "state_dict" not in checkpoint:
        raise HepasegError(f"{path}: not a hepaseg checkpoint: expected a file written by `hepaseg train` "
                           "(with a 'hepaseg' entry), got a torch file without one")
    return checkpoint


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def checkpoint_model_options(meta: dict[str, Any]) -> dict[str, Any]:
    """The architecture options a checkpoint's network was trained with.

    Checkpoints record every resolved option; older ones only the options given, and for
    those the model's ``legacy_options`` (the defaults of that time where today's differ,
    e.g. MFCNet's DANet channel form) fill the options they do not name.
    """
    from hepaseg.models import model_info  # models is the stage above training

    options = dict(meta.get("model_options") or {})
    try:
        legacy = model_info(meta["model"]).legacy_options
    except (HepasegError, KeyError):
        return options  # build_model reports the unknown model with the checkpoint's path
    return {**legacy, **options}


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> LoadedModel:
    """Rebuild the trained network from ``path`` alone (weights-only loading, no Lightning needed).

    Example::

        loaded = load_checkpoint("runs/mfcnet/best.ckpt")
        logits = loaded.model(x)  # x: (N, loaded.in_channels, H, W) float in [0, 1]
    """
    from hepaseg.models import build_model  # models is the stage above training

    path = Path(path)
    checkpoint = read_checkpoint(path, map_location)
    meta = checkpoint["hepaseg"]
    try:
        model = build_model(
            meta["model"],
            in_channels=int(meta["in_channels"]),
            num_classes=int(meta["num_classes"]),
            base_width=int(meta["base_width"]),
            **checkpoint_model_options(meta),
        )
    except HepasegError as exc:
        raise HepasegError(f"{path}: {exc}") from None
    except KeyError as exc:
        raise HepasegError(f"{path}: incomplete hepaseg checkpoint: missing {exc}") from None
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise HepasegError(f"{path}: weights do not fit model {meta['model']!r}: {first}") from None
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
    return LoadedModel(
        model=model,
        model_name=meta["model"],
        model_options=checkpoint_model_options(meta),
        data_options=dict(meta.get("data_options", {})),
        metrics=dict(meta.get("metrics", {})),
        version=str(meta.get("version", "unknown")),
        config=dict(meta.get("config", {})),
        in_channels=int(meta["in_channels"]),
        num_classes=int(meta["num_classes"]),
        base_width=int(meta["base_width"]),
    )
