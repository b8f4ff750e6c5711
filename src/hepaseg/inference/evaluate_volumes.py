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

With ``liver_checkpoint`` the liver-first cascade (:mod:`hepaseg.inference.cascade`) predicts
each case, exactly as ``hepaseg predict --liver-checkpoint`` does, and both stages are scored:
the tumour as above, the liver (largest component) against ``label > 0`` in the ``liver_*``
columns (:data:`LIVER_CSV_COLUMNS`) and a ``summary["liver"]`` section, plus the predicted and
reference liver volumes and tumour burdens (:data:`BURDEN_CSV_COLUMNS`).

Several tumour (or liver) checkpoints form an ensemble (:mod:`hepaseg.inference.ensemble`:
probabilities averaged over members and flips); ``postprocess`` edits each predicted mask
before it is scored (:mod:`hepaseg.inference.postprocess`; off by default).
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
from hepaseg.evaluation.evaluate import check_threshold, json_safe
from hepaseg.evaluation.metrics import global_dice, volume_metrics
from hepaseg.inference.cascade import check_cascade, predict_cascade, require_liver_stage
from hepaseg.inference.ensemble import load_ensemble, predict_ensemble
from hepaseg.inference.postprocess import PostProcess, postprocess_mask
from hepaseg.io import DicomOptions, check_output_dir, find_cases, read_volume, write_output_marker
from hepaseg.io.atomic import atomic_path, write_json_atomic
from hepaseg.io.volume import LABEL_TUMOR

__all__ = [
    "BURDEN_CSV_COLUMNS", "LIVER_CSV_COLUMNS", "VOLUME_CSV_COLUMNS", "VolumeEvaluationResult", "evaluate_volumes",
]

#: Columns of ``volumes.csv``: distances in mm, fractions in [0, 1], counts in voxels.
VOLUME_CSV_COLUMNS = (
    "case", "source", "dice", "jaccard", "rvd", "assd", "hd95", "hausdorff",
    "intersection", "pred_voxels", "target_voxels", "spacing_z", "spacing_y", "spacing_x", "seconds",
)
#: Columns added (after those) with a liver stage: the liver's metrics vs label > 0, and warnings.
LIVER_CSV_COLUMNS = (
    "liver_dice", "liver_jaccard", "liver_rvd", "liver_assd", "liver_hd95", "liver_hausdorff",
    "liver_intersection", "liver_pred_voxels", "liver_target_voxels", "warnings",
)
#: Columns added (after those) with a liver stage: volumes in mL, burden = % of the liver's voxels that are tumour.
BURDEN_CSV_COLUMNS = (
    "liver_volume_ml", "tumor_burden_percent", "reference_liver_volume_ml", "reference_tumor_burden_percent",
)


@dataclass
class VolumeEvaluationResult:
    """Per-case volume metrics of one checkpoint and their summary.

    ``summary``: ``n_cases``, ``dice_per_case`` (mean of per-case Dice), ``dice_global``
    (LiTS pooled Dice), means of ``jaccard``, ``assd``, ``hd95``, ``hausdorff`` (mm) over all
    cases, and ``rvd`` (mean signed RVD over the cases whose reference has a tumour;
    ``n_cases_with_tumor`` of them). With a liver stage, ``summary["liver"]`` holds the same
    keys (but ``n_cases_with_tumor``) for the liver, and ``liver_checkpoint`` is set.
    """

    model_name: str
    checkpoint: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    skipped: list[str]
    options: dict[str, Any]
    out_dir: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    liver_checkpoint: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)  # every member (checkpoint = the first)
    liver_checkpoints: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return json_safe({
            "format": "hepaseg-eval-volumes/1",
            "hepaseg_version": __version__,
            "model": self.model_name,
            "checkpoint": str(self.checkpoint),
            "checkpoints": [str(c) for c in self.checkpoints or [self.checkpoint]],
            "liver_checkpoint": None if self.liver_checkpoint is None else str(self.liver_checkpoint),
            "liver_checkpoints": [str(c) for c in self.liver_checkpoints],
            "options": self.options,
            "summary": self.summary,
            "cases": self.rows,
            "skipped_unlabelled": self.skipped,
        })


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _paths(value) -> list[Path]:
    if value is None:
        return []
    return [Path(value)] if isinstance(value, (str, os.PathLike)) else [Path(v) for v in value]


def _burden(tumor: np.ndarray, liver: np.ndarray, spacing) -> tuple[float, float]:
    """(liver volume mL, % of the liver's voxels that are tumour)."""
    n_liver = int(np.count_nonzero(liver))
    voxel_ml = float(np.prod(np.asarray(spacing, np.float64))) / 1000.0
    burden = 100.0 * int(np.count_nonzero((tumor != 0) & (liver != 0))) / n_liver if n_liver else math.nan
    return n_liver * voxel_ml, burden


def evaluate_volumes(
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike],
    sources: Sequence[str | os.PathLike],
    *,
    batch: int = 8,
    threshold: float = 0.5,
    tta: bool = False,
    device: str | None = "cpu",
    out: str | os.PathLike | None = None,
    progress: bool = False,
    liver_checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    postprocess: PostProcess | None = None,
    dicom: DicomOptions | None = None,
) -> VolumeEvaluationResult:
    """Predict each labelled case of ``sources`` and score it in 3D (distances in mm).

    Args:
        checkpoint: ``RUN/best.ckpt`` from ``hepaseg train``, or several (an ensemble).
        sources: CT files or folders (anything :func:`hepaseg.io.find_cases` expands); cases
            without a label are skipped and listed in ``skipped``.
        batch: slices per forward pass (default 8).
        threshold: tumour where the probability (resized to the scan's resolution) is
            ``> threshold`` (default 0.5).
        tta: average the identity and the two flips (default False).
        device: ``"cpu"`` (default), ``"cuda"``, or ``None`` for CUDA when available. Always fp32.
        out: directory for ``volumes.json`` and ``volumes.csv`` (default
            ``<first checkpoint's dir>/eval-volumes/``, ``eval-volumes-ensemble/`` for several).
        progress: show a progress bar per case (stderr).
        liver_checkpoint: a liver-stage checkpoint (or several): predict with the cascade and score
            both stages (required for a tumour checkpoint trained with ``roi == "liver"``).
        postprocess: applied to each predicted tumour mask before scoring (default None: none).
        dicom: series choice and SEG labels of DICOM study cases (``--series``, ``--seg`` for a
            single case, ``--seg-labels``).

    Returns:
        A :class:`VolumeEvaluationResult`; rows hold :func:`volume_metrics` of each case
        (tumour = label 2 vs. the predicted mask), its spacing (mm) and prediction seconds.

    Raises:
        HepasegError: a bad ``threshold``/``batch``, an ``out`` that is not an evaluate output or
            overlaps an input (checked first), missing sources, unreadable cases, no labelled case, a bad checkpoint, a
            liver-cropped tumour checkpoint without ``liver_checkpoint``, or two checkpoints that
            do not form a cascade.
    """
    threshold, postprocess, checkpoints, liver_checkpoints = _check_options(
        checkpoint, liver_checkpoint, threshold=threshold, batch=batch, postprocess=postprocess)
    default = "eval-volumes" if len(checkpoints) == 1 else "eval-volumes-ensemble"
    out_dir = Path(out) if out is not None else checkpoints[0].parent / default
    # Before any work; `hepaseg evaluate` writes its slice and volume results into one folder.
    check_output_dir(out_dir, command="evaluate", inputs=[*checkpoints, *liver_checkpoints, *sources], reuse=True)
    loaded, liver = _load_stages(checkpoints, liver_checkpoints)
    cases = _find_cases(sources, dicom)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for path in cases:
        volume = read_volume(path, with_label=True, dicom=dicom)
        if volume.label is None:
            skipped.append(volume.case_id)
            continue
        rows.append(_score_case(path, volume, loaded, liver, batch=batch, threshold=threshold, tta=tta,
                                device=device, progress=progress, postprocess=postprocess))
    if not rows:
        raise HepasegError(
            f"--volumes: no labelled case in {', '.join(map(str, sources))}: expected CT cases with a tumour "
            f"label (LiTS, MSD Task03, 3D-IRCADb, MRC pairs), got only unlabelled ones ({', '.join(skipped)})"
        )
    result = VolumeEvaluationResult(
        model_name=loaded.model_name,
        checkpoint=checkpoints[0],
        rows=rows,
        summary=_summary(rows, with_liver=liver is not None),
        skipped=skipped,
        options=_options(loaded, liver, batch=batch, threshold=threshold, tta=tta, device=device,
                         postprocess=postprocess),
        liver_checkpoint=liver_checkpoints[0] if liver_checkpoints else None,
        checkpoints=checkpoints,
        liver_checkpoints=liver_checkpoints,
    )
    _write_outputs(out_dir, result, with_liver=liver is not None)
    return result


def _check_options(checkpoint, liver_checkpoint, *, threshold: float, batch: int,
                   postprocess: PostProcess | None) -> tuple[float, PostProcess, list[Path], list[Path]]:
    """The checked (threshold, postprocess, checkpoints, liver checkpoints); one-line errors before any work."""
    threshold = check_threshold(threshold)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise HepasegError(f"--batch: invalid value: expected a positive integer, got {batch!r}")
    postprocess = postprocess or PostProcess()
    checkpoints, liver_checkpoints = _paths(checkpoint), _paths(liver_checkpoint)
    if not checkpoints:
        raise HepasegError("--checkpoint: expected at least one checkpoint from `hepaseg train`, got none")
    if postprocess.needs_liver and not liver_checkpoints:
        postprocess_mask(np.zeros((1, 1, 1)), (1, 1, 1), postprocess)  # raises the one-line error
    return threshold, postprocess, checkpoints, liver_checkpoints


def _load_stages(checkpoints: list[Path], liver_checkpoints: list[Path]):
    """(tumour ensemble, liver ensemble or None), checked to form a cascade when there is a liver stage."""
    loaded = load_ensemble(checkpoints, option="--checkpoint")
    liver = None
    if not liver_checkpoints:
        require_liver_stage(loaded.data_options, source=f"--checkpoint {checkpoints[0]}")
    else:
        liver = load_ensemble(liver_checkpoints, option="--liver-checkpoint")
        check_cascade(liver.data_options, loaded.data_options,
                      liver_source=f"--liver-checkpoint {liver_checkpoints[0]}",
                      tumor_source=f"--checkpoint {checkpoints[0]}")
    return loaded, liver


def _find_cases(sources: Sequence[str | os.PathLike], dicom: DicomOptions | None) -> list[Path]:
    cases = find_cases(list(sources))
    if dicom is not None and dicom.seg and len(cases) != 1:
        raise HepasegError(
            f"--seg: names the SEG files of one case: expected a single case, got {len(cases)}. Put each case's SEG "
            "in its study folder (it is found there)"
        )
    return cases


def _score_case(path, volume, loaded, liver, *, batch: int, threshold: float, tta: bool, device: str | None,
                progress: bool, postprocess: PostProcess) -> dict[str, Any]:
    """One ``volumes.csv`` row: predict ``volume`` (cascade when ``liver``), post-process, score in mm."""
    t0 = time.perf_counter()
    cascade = None
    if liver is None:
        pred = predict_ensemble(loaded.models, volume, loaded.data_options, batch=batch, tta=tta,
                                device=device, precision="fp32", progress=progress).mask(threshold)
    else:
        cascade = predict_cascade(liver.models, liver.data_options, loaded.models, loaded.data_options, volume,
                                  batch=batch, tta=tta, threshold=threshold, device=device, precision="fp32",
                                  progress=progress)
        pred = cascade.tumor
    pred, _ = postprocess_mask(pred, volume.spacing, postprocess,
                               liver=None if cascade is None else cascade.liver)
    seconds = time.perf_counter() - t0
    metrics = volume_metrics(pred, volume.label == LABEL_TUMOR, volume.spacing)
    sz, sy, sx = (float(s) for s in volume.spacing)
    row = {"case": volume.case_id, "source": str(path), **metrics,
           "spacing_z": sz, "spacing_y": sy, "spacing_x": sx, "seconds": seconds}
    if cascade is not None:
        liver_metrics = volume_metrics(cascade.liver, volume.label > 0, volume.spacing)
        row.update({f"liver_{k}": v for k, v in liver_metrics.items()})
        row["warnings"] = "; ".join(cascade.warnings)
        row["liver_volume_ml"], row["tumor_burden_percent"] = _burden(pred, cascade.liver, volume.spacing)
        row["reference_liver_volume_ml"], row["reference_tumor_burden_percent"] = _burden(
            volume.label == LABEL_TUMOR, volume.label > 0, volume.spacing)
    return row


def _summary(rows: list[dict[str, Any]], *, with_liver: bool) -> dict[str, Any]:
    """:attr:`VolumeEvaluationResult.summary` of the case rows."""
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
    if with_liver:
        liver_rows = [{k[len("liver_"):]: v for k, v in r.items() if k.startswith("liver_")} for r in rows]
        summary["liver"] = {
            "n_cases": len(rows),
            "dice_per_case": _mean([r["dice"] for r in liver_rows]),
            "dice_global": global_dice(liver_rows),
            **{k: _mean([r[k] for r in liver_rows]) for k in ("jaccard", "rvd", "assd", "hd95", "hausdorff")},
        }
        summary["burden"] = {k: _mean([r[k] for r in rows if not math.isnan(r[k])]) for k in BURDEN_CSV_COLUMNS}
    return summary


def _options(loaded, liver, *, batch: int, threshold: float, tta: bool, device: str | None,
             postprocess: PostProcess) -> dict[str, Any]:
    """The ``options`` section of ``volumes.json``."""
    return {"batch": batch, "threshold": threshold, "tta": tta, "precision": "fp32",
            "device": device or "auto", "data_options": loaded.data_options, "n_members": len(loaded),
            "postprocess": {**postprocess.as_dict(), "applied": postprocess.describe()},
            **({} if liver is None else {"liver_model": liver.model_name, "liver_members": len(liver),
                                         "liver_data_options": liver.data_options})}


def _write_outputs(out_dir: Path, result: VolumeEvaluationResult, *, with_liver: bool) -> None:
    """``volumes.csv`` and ``volumes.json`` (each atomically) plus the output marker; sets ``result.paths``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_output_marker(out_dir, "evaluate")
    result.out_dir = out_dir
    with atomic_path(out_dir / "volumes.csv") as tmp, open(tmp, "w", newline="") as fh:
        columns = VOLUME_CSV_COLUMNS + (LIVER_CSV_COLUMNS + BURDEN_CSV_COLUMNS if with_liver else ())
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()})
    result.paths["csv"] = out_dir / "volumes.csv"
    result.paths["json"] = write_json_atomic(out_dir / "volumes.json", result.to_json())
