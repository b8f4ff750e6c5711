"""Whole-case evaluation of a checkpoint (``hepaseg evaluate --volumes``).

Unlike the slice-level Table 1 evaluation (:func:`hepaseg.evaluation.evaluate_checkpoint`,
prepared slices at ``size x size`` pixels), this predicts every axial slice of each
labelled CT case at the scan's own resolution (:func:`hepaseg.inference.predict_volume`,
exactly as ``hepaseg predict`` does) and scores the 3D tumour mask with
:func:`hepaseg.evaluation.metrics.volume_metrics`: per-case Dice, Jaccard, RVD and the
surface distances ASSD, HD95 and Hausdorff in mm, plus the LiTS "Dice global" pooled over
cases. It lives in ``inference`` because it needs the whole-volume predictor, which sits
below ``evaluation`` in the package chain.

Outputs in ``out`` (written atomically): ``volumes.json`` (summary + per-case rows + options)
and ``volumes.csv`` (one line per case).
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hepaseg import __version__
from hepaseg.errors import HepasegError
from hepaseg.evaluation.evaluate import json_safe
from hepaseg.evaluation.metrics import global_dice, volume_metrics
from hepaseg.inference.predictor import predict_volume
from hepaseg.io import find_cases, read_volume
from hepaseg.io.atomic import atomic_path, write_json_atomic
from hepaseg.io.volume import LABEL_TUMOR

__all__ = ["VOLUME_CSV_COLUMNS", "VolumeEvaluationResult", "evaluate_volumes"]

#: Columns of ``volumes.csv``: distances in mm, fractions in [0, 1], counts in voxels.
VOLUME_CSV_COLUMNS = (
    "case", "source", "dice", "jaccard", "rvd", "assd", "hd95", "hausdorff",
    "intersection", "pred_voxels", "target_voxels", "spacing_z", "spacing_y", "spacing_x", "seconds",
)


@dataclass
class VolumeEvaluationResult:
    """Per-case volume metrics of one checkpoint and their summary.

    ``summary``: ``n_cases``, ``dice_per_case`` (mean of per-case Dice), ``dice_global``
    (LiTS pooled Dice), means of ``jaccard``, ``assd``, ``hd95``, ``hausdorff`` (mm) over all
    cases, and ``rvd`` (mean signed RVD over the cases whose reference has a tumour;
    ``n_cases_with_tumor`` of them).
    """

    model_name: str
    checkpoint: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    skipped: list[str]
    options: dict[str, Any]
    out_dir: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return json_safe({
            "format": "hepaseg-eval-volumes/1",
            "hepaseg_version": __version__,
            "model": self.model_name,
            "checkpoint": str(self.checkpoint),
            "options": self.options,
            "summary": self.summary,
            "cases": self.rows,
            "skipped_unlabelled": self.skipped,
        })


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def evaluate_volumes(
    checkpoint: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    *,
    batch: int = 8,
    threshold: float = 0.5,
    tta: bool = False,
    device: str | None = "cpu",
    out: str | os.PathLike | None = None,
    progress: bool = False,
) -> VolumeEvaluationResult:
    """Predict each labelled case of ``sources`` and score it in 3D (distances in mm).

    Args:
        checkpoint: ``RUN/best.ckpt`` from ``hepaseg train``.
        sources: CT files or folders (anything :func:`hepaseg.io.find_cases` expands); cases
            without a label are skipped and listed in ``skipped``.
        batch: slices per forward pass (default 8).
        threshold: tumour where the probability (resized to the scan's resolution) is
            ``> threshold`` (default 0.5).
        tta: average the identity and the two flips (default False).
        device: ``"cpu"`` (default), ``"cuda"``, or ``None`` for CUDA when available. Always fp32.
        out: directory for ``volumes.json`` and ``volumes.csv`` (default
            ``<checkpoint dir>/eval-volumes/``).
        progress: show a progress bar per case (stderr).

    Returns:
        A :class:`VolumeEvaluationResult`; rows hold :func:`volume_metrics` of each case
        (tumour = label 2 vs. the predicted mask), its spacing (mm) and prediction seconds.

    Raises:
        HepasegError: missing sources, unreadable cases, no labelled case, a bad checkpoint.
    """
    from hepaseg.training import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    cases = find_cases(list(sources))
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for path in cases:
        volume = read_volume(path, with_label=True)
        if volume.label is None:
            skipped.append(volume.case_id)
            continue
        t0 = time.perf_counter()
        pred = predict_volume(loaded.model, volume, loaded.data_options, batch=batch, tta=tta,
                              threshold=threshold, device=device, precision="fp32", progress=progress)
        seconds = time.perf_counter() - t0
        metrics = volume_metrics(pred, volume.label == LABEL_TUMOR, volume.spacing)
        sz, sy, sx = (float(s) for s in volume.spacing)
        rows.append({"case": volume.case_id, "source": str(path), **metrics,
                     "spacing_z": sz, "spacing_y": sy, "spacing_x": sx, "seconds": seconds})
    if not rows:
        raise HepasegError(
            f"--volumes: no labelled case in {', '.join(map(str, sources))}: expected CT cases with a tumour "
            f"label (LiTS, MSD Task03, 3D-IRCADb, MRC pairs), got only unlabelled ones ({', '.join(skipped)})"
        )
    with_tumor = [r for r in rows if r["target_voxels"] > 0]
    summary = {
        "n_cases": len(rows),
        "dice_per_case": _mean([r["dice"] for r in rows]),
        "dice_global": global_dice(rows),
        "jaccard": _mean([r["jaccard"] for r in rows]),
        "rvd": _mean([r["rvd"] for r in with_tumor]),
        "n_cases_with_tumor": len(with_tumor),
        "assd": _mean([r["assd"] for r in rows]),
        "hd95": _mean([r["hd95"] for r in rows]),
        "hausdorff": _mean([r["hausdorff"] for r in rows]),
    }
    result = VolumeEvaluationResult(
        model_name=loaded.model_name,
        checkpoint=Path(checkpoint),
        rows=rows,
        summary=summary,
        skipped=skipped,
        options={"batch": batch, "threshold": threshold, "tta": tta, "precision": "fp32",
                 "device": device or "auto", "data_options": loaded.data_options},
    )
    out_dir = Path(out) if out is not None else Path(checkpoint).parent / "eval-volumes"
    out_dir.mkdir(parents=True, exist_ok=True)
    result.out_dir = out_dir
    with atomic_path(out_dir / "volumes.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=VOLUME_CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()})
    result.paths["csv"] = out_dir / "volumes.csv"
    result.paths["json"] = write_json_atomic(out_dir / "volumes.json", result.to_json())
    return result
