"""``hepaseg predict`` and ``hepaseg export``: one CT case in, a folder of results out.

:func:`predict_case` reads a case (any format :func:`hepaseg.io.read_volume`
knows), rebuilds the network and its preprocessing from a checkpoint (or an
exported ONNX file, whose metadata carries the same ``data_options``), predicts
the tumour at the scan's own resolution and writes::

    OUT_DIR/tumor_mask.nii.gz   uint8, the input's shape and affine (0/1, or 0/1/2 with labels="lits")
    OUT_DIR/lesions.csv         one row per lesion (see hepaseg.inference.lesions)
    OUT_DIR/lesions.json        the same rows plus case, model and settings
    OUT_DIR/overlay.png         the slices with the most tumour, outlined
    OUT_DIR/metrics.json        only when the input has labels: Dice, ASSD, HD95, ... vs label == 2

With ``liver_checkpoint`` (``--liver-checkpoint``) the liver-first cascade of
:mod:`hepaseg.inference.cascade` runs instead of a single network, and also::

    OUT_DIR/liver_mask.nii.gz   uint8 0/1: the predicted liver (largest 3D component)

Several checkpoints (``--checkpoint`` repeated, or ``--checkpoints-from`` a compare/crossval
ensemble list) form an ensemble whose probabilities are averaged over members and flips
(:mod:`hepaseg.inference.ensemble`); so may the liver stage's. ``save_probabilities``
(``--save-probabilities``) adds, in the source's exact geometry (uint16 with ``scl_slope``
1/65535, read back as float in [0, 1]: NIfTI has no float16)::

    OUT_DIR/tumor_probability.nii.gz  mean tumour probability over members and flips (before post-processing)
    OUT_DIR/tumor_uncertainty.nii.gz  sd of the tumour probability over members and flips (0 for one
                                      member without --tta)
    OUT_DIR/liver_probability.nii.gz  (cascade) mean liver probability

``lesions.csv`` carries, per lesion, the columns of :mod:`hepaseg.inference.lesion_stats`
(mean/max probability, mean uncertainty, member agreement, share inside the liver and distance
to the liver's surface; the liver is the cascade's prediction, else the input's label when it
has one), and ``lesions.json`` a ``summary``: lesion count, tumour volume and, after a cascade,
the liver volume and the tumour burden (% of the liver). ``postprocess`` (:mod:`hepaseg.inference.
postprocess`; off by default) edits the mask before the lesions are counted.

``labels="lits"`` then takes the liver from that prediction (not from the input's label);
``metrics.json`` (labelled input) adds ``liver`` (vs label > 0) and ``tumor`` (vs label == 2)
sections, the flat keys staying the tumour's; ``lesions.json`` carries a ``warnings`` list
(e.g. no liver found: the tumour mask is empty), which the CLI prints.

Every file is written into a temporary folder beside ``OUT_DIR`` that is renamed
into place at the end, so ``OUT_DIR`` is either complete or untouched.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hepaseg import __version__
from hepaseg.errors import HepasegError
from hepaseg.evaluation.evaluate import json_safe
from hepaseg.inference.cascade import KEEP_MARGIN_MM, check_cascade, predict_cascade, require_liver_stage
from hepaseg.inference.ensemble import load_ensemble, predict_ensemble
from hepaseg.inference.lesion_stats import lesion_confidence
from hepaseg.inference.lesions import lesion_table, lesions_to_csv
from hepaseg.inference.onnx_engine import OnnxModel, export_onnx
from hepaseg.inference.overlay import draw_overlay
from hepaseg.inference.postprocess import PostProcess, postprocess_mask
from hepaseg.inference.predictor import check_volume_for_model
from hepaseg.inference.preprocess import parse_data_options
from hepaseg.io import (
    CANONICAL_DESCRIPTION,
    LABEL_LIVER,
    LABEL_TUMOR,
    read_volume,
    replace_dir,
    write_json_atomic,
    write_label_nifti,
    write_probability_nifti,
    write_text_atomic,
)

__all__ = ["LABEL_MODES", "OUTPUT_FILES", "PredictResult", "check_ct_image", "export_checkpoint", "predict_case"]

OUTPUT_FILES = ("tumor_mask.nii.gz", "lesions.csv", "lesions.json", "overlay.png", "metrics.json")
PROBABILITY_FILES = ("tumor_probability.nii.gz", "tumor_uncertainty.nii.gz", "liver_probability.nii.gz")
UNCERTAINTY_DEFINITION = (
    "standard deviation (ddof 0) of the tumour probability over the ensemble members x flips, computed at the "
    "network's resolution and resized bilinearly like the probability; 0 for one member without --tta"
)
LABEL_MODES = ("tumor", "lits")
#: A CT scan in HU has air (about -1000 HU) around or inside the body; below this, it is there.
AIR_BELOW_HU = -500.0


@dataclass
class PredictResult:
    """What :func:`predict_case` wrote and measured.

    Attributes:
        out_dir: the output folder.
        paths: ``{"mask", "lesions_csv", "lesions_json", "overlay", "metrics"}`` -> file
            (``metrics`` only when the input has labels).
        lesions: :func:`~hepaseg.inference.lesions.lesion_table` rows, largest first, with the
            :mod:`~hepaseg.inference.lesion_stats` columns.
        metrics: volume metrics of the predicted tumour vs the input's label == 2, or None.
        timings: seconds for ``read``, ``inference`` and ``write`` (and ``load_model``).
        case_id, shape (z, y, x), spacing (mm, z y x), engine (``torch``/``onnx``), model_name.
        warnings: problems worth telling the user (cascade: no liver found); also in lesions.json.
        summary: ``n_lesions``, ``tumor_volume_ml`` and, after a cascade, ``liver_volume_ml`` and
            ``tumor_burden_percent`` (tumour voxels inside the predicted liver / liver voxels x 100).
    """

    out_dir: Path
    paths: dict[str, Path]
    lesions: list[dict]
    metrics: dict[str, Any] | None
    timings: dict[str, float]
    summary: dict[str, Any] = field(default_factory=dict)
    case_id: str = ""
    shape: tuple[int, int, int] = (0, 0, 0)
    spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)
    engine: str = "torch"
    model_name: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def check_ct_image(image: np.ndarray, source: str) -> None:
    """Refuse images that are not CT in Hounsfield units.

    A CT volume in HU always shows air (about -1000 HU) outside or inside the body; MRI,
    PET or 8-bit images start at 0. Non-finite values are refused too.

    Raises:
        HepasegError: naming ``source``.
    """
    finite = np.isfinite(image)
    if not finite.all():
        raise HepasegError(
            f"{source}: image holds {int((~finite).sum())} NaN/inf voxels: expected finite CT values in HU. "
            "Fix or re-export the scan"
        )
    lowest = float(image.min())
    if lowest > AIR_BELOW_HU:
        raise HepasegError(
            f"{source}: does not look like CT in Hounsfield units: expected air near -1000 HU somewhere in "
            f"the volume, got a minimum of {lowest:g}. Pass a CT scan (MRI/PET are not supported), with "
            "rescale slope/intercept applied"
        )


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise HepasegError(f"{out_dir}: --out exists and is a file: expected a new or empty directory. "
                           "Choose another --out")
    others = sorted(p.name for p in out_dir.iterdir())
    if others and not overwrite:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise HepasegError(
            f"{out_dir}: --out already holds files ({shown}): expected a new or empty directory. "
            "Pass --overwrite to replace it, or choose another --out; nothing was written"
        )


def _load_engine(checkpoint, onnx_model) -> tuple[Any, dict, str, str, dict]:
    """(model, data_options, engine, model_name, model_options) from a checkpoint or an ONNX file."""
    if onnx_model is not None:
        model = OnnxModel(onnx_model)
        data_options = model.data_options
        name, options = model.model_name or "unknown", model.metadata.get("model_options", {})
        if data_options is None and checkpoint is not None:
            from hepaseg.training import load_checkpoint

            loaded = load_checkpoint(checkpoint)
            data_options, name, options = loaded.data_options, loaded.model_name, loaded.model_options
        if data_options is None:
            raise HepasegError(
                f"{onnx_model}: ONNX file has no hepaseg data_options metadata: expected a file written by "
                "`hepaseg export`. Re-export it, or also pass --checkpoint to take the preprocessing from it"
            )
        return model, dict(data_options), "onnx", name, dict(options)
    if checkpoint is None:
        raise HepasegError("--checkpoint: expected a checkpoint (or --engine onnx with --model FILE), got none")
    from hepaseg.training import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    return loaded.model, dict(loaded.data_options), "torch", loaded.model_name, dict(loaded.model_options)


def _paths(value: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def _load_members(checkpoints: list[Path], onnx_model) -> tuple[list, dict, str, str, dict]:
    """(models, data_options, engine, model_name, model_options) of one ONNX file or one or more checkpoints."""
    if onnx_model is not None or len(checkpoints) <= 1:
        model, data_options, engine, name, options = _load_engine(checkpoints[0] if checkpoints else None,
                                                                  onnx_model)
        return [model], data_options, engine, name, options
    ensemble = load_ensemble(checkpoints, option="--checkpoint")
    return list(ensemble.models), dict(ensemble.data_options), "torch", ensemble.model_name, \
        dict(ensemble.model_options[0])


def _summary(tumor: np.ndarray, spacing, liver: np.ndarray | None, n_lesions: int) -> dict[str, Any]:
    """Lesion count, tumour volume (mL) and, with a liver, its volume and the tumour burden (% of the liver)."""
    voxel_ml = float(np.prod(np.asarray(spacing, np.float64))) / 1000.0
    tumor = np.asarray(tumor) != 0
    out: dict[str, Any] = {"n_lesions": int(n_lesions), "tumor_volume_ml": int(np.count_nonzero(tumor)) * voxel_ml}
    if liver is not None:
        liver = np.asarray(liver) != 0
        n_liver = int(np.count_nonzero(liver))
        out["liver_volume_ml"] = n_liver * voxel_ml
        # Burden: the share of the liver taken by tumour (tumour voxels inside the liver mask).
        out["tumor_burden_percent"] = 100.0 * int(np.count_nonzero(tumor & liver)) / n_liver if n_liver else math.nan
    return out


def predict_case(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    onnx_model: str | os.PathLike | None = None,
    liver_checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    batch: int = 8,
    tta: bool = False,
    threshold: float = 0.5,
    labels: str = "tumor",
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    precision: str = "auto",
    save_probabilities: bool = False,
    postprocess: PostProcess | None = None,
) -> PredictResult:
    """Predict the liver tumours of one CT case and write the results folder (see module docstring).

    Args:
        input_path: a CT case (LiTS/MSD/NIfTI/DICOM/3D-IRCADb/MRC; see ``read_volume``). Labels are
            read when the format has them (LiTS, MSD, 3D-IRCADb, MRC) and give ``metrics.json``.
        out_dir: output folder; must be new or empty unless ``overwrite``.
        checkpoint: a ``hepaseg train`` checkpoint (torch engine), or several: an ensemble
            (members must share their data options).
        onnx_model: an ``hepaseg export`` file (onnx engine; takes precedence over ``checkpoint``,
            whose data options are used only if the ONNX file has none).
        liver_checkpoint: a liver-stage checkpoint (``target == "liver"``), or several (an
            ensemble): run the liver-first cascade (:mod:`hepaseg.inference.cascade`), with
            ``checkpoint``/``onnx_model`` as the tumour stage. Required for a tumour checkpoint
            trained with ``roi == "liver"``.
        batch: slices per forward pass (default 8).
        tta: flip test-time augmentation (3 passes).
        threshold: tumour probability threshold in (0, 1) (default 0.5).
        labels: ``"tumor"`` (default: mask 0/1) or ``"lits"`` (0 background, 1 liver, 2 tumour; the
            liver comes from the input's own label map, so the input must have one -- or, with
            ``liver_checkpoint``, from the predicted liver).
        overwrite: replace an ``out_dir`` that already holds files.
        progress: show a progress bar over slices.
        device: torch device (default CUDA when available); ignored by the onnx engine.
        precision: torch autocast precision (see :func:`predict_volume`; default ``"auto"``).
        save_probabilities: also write the probability and uncertainty NIfTIs (module docstring).
        postprocess: :class:`~hepaseg.inference.postprocess.PostProcess` applied to the tumour mask
            (default None: none).

    Returns:
        :class:`PredictResult`.

    Raises:
        HepasegError: unreadable / 2D / non-CT input, an input the model's data options cannot be
            met with, no liver for ``labels="lits"`` (without a liver stage), an ``out_dir`` holding
            other files, a corrupt checkpoint or ONNX file, a liver-cropped tumour checkpoint without
            ``liver_checkpoint``, or two checkpoints that do not form a cascade. Nothing is written then.
    """
    if labels not in LABEL_MODES:
        raise HepasegError(f"--labels: expected one of {', '.join(LABEL_MODES)}, got {labels!r}")
    if not 0.0 < float(threshold) < 1.0:
        raise HepasegError(f"--threshold: expected a probability in (0, 1), got {threshold!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise HepasegError(f"--batch: expected a positive integer, got {batch!r}")
    postprocess = postprocess or PostProcess()
    checkpoints, liver_checkpoints = _paths(checkpoint), _paths(liver_checkpoint)
    if postprocess.needs_liver and not liver_checkpoints:
        postprocess_mask(np.zeros((1, 1, 1)), (1, 1, 1), postprocess)  # raises the one-line error
    input_path, out_dir = Path(input_path), Path(out_dir)
    _check_out_dir(out_dir, overwrite)  # fail before the slow parts
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    models, data_options, engine, model_name, model_options = _load_members(checkpoints, onnx_model)
    model = models[0]
    tumor_source = "--model" if onnx_model is not None else "--checkpoint"
    tumor_source = f"{tumor_source} {onnx_model if onnx_model is not None else ', '.join(map(str, checkpoints))}"
    liver_loaded = None
    if not liver_checkpoints:
        require_liver_stage(data_options, source=tumor_source)
    else:
        liver_loaded = load_ensemble(liver_checkpoints, option="--liver-checkpoint")
        check_cascade(liver_loaded.data_options, data_options,
                      liver_source=f"--liver-checkpoint {liver_checkpoints[0]}", tumor_source=tumor_source)
    timings["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    volume, label_note = _read_case(input_path)
    source = str(input_path)
    check_ct_image(volume.image, source)
    check_volume_for_model(volume.image, data_options, model=model, source=source)
    liver = None
    if labels == "lits" and liver_loaded is None:
        if volume.label is None or not np.any(volume.label > 0):
            raise HepasegError(
                f"{source}: --labels lits needs a liver mask: expected the input to carry a label map with "
                "liver (1), got none. Use --labels tumor, or pass a labelled case (LiTS/MSD/3D-IRCADb)"
            )
        liver = volume.label > 0  # liver including tumour
    timings["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cascade = None
    if liver_loaded is None:
        # The spread needs two members or flips (one member without TTA has none: 0 by definition);
        # votes need two members.
        spread = len(models) > 1 or bool(tta)
        found = predict_ensemble(
            models, volume, data_options, batch=batch, tta=tta, threshold=threshold, device=device,
            precision=precision, progress=progress, uncertainty=spread, votes=len(models) > 1,
        )
        raw_tumor = found.mask(threshold)  # (z, y, x) uint8 {0, 1}
        probability, uncertainty, votes = found.probability, found.uncertainty, found.votes
        if uncertainty is None and save_probabilities:
            uncertainty = np.zeros(probability.shape, dtype=np.float32)
    else:
        cascade = predict_cascade(
            liver_loaded.models, liver_loaded.data_options, models, data_options, volume, batch=batch, tta=tta,
            threshold=threshold, device=device, precision=precision, progress=progress, details=True,
        )
        raw_tumor = cascade.tumor
        probability, uncertainty, votes = cascade.tumor_probability, cascade.tumor_uncertainty, cascade.tumor_votes
        if labels == "lits":
            liver = cascade.liver > 0  # predicted liver; tumour lies within 5 mm of it
        timings.update({f"inference_{k}": v for k, v in cascade.timings.items()})
    predicted_liver = cascade.liver if cascade is not None else None
    tumor, postprocess_info = postprocess_mask(raw_tumor, volume.spacing, postprocess, liver=predicted_liver)
    timings["inference"] = time.perf_counter() - t0
    warnings = list(cascade.warnings) if cascade is not None else []
    geometry = volume.source_geometry
    if data_options.get("orientation") is None and geometry is not None and not geometry.is_identity:
        warnings.append(
            f"the checkpoint was trained on slices prepared before hepaseg sliced every source in one "
            f"orientation, and this {geometry.axcodes} input was reoriented to LPS: re-prepare and re-train"
        )

    t0 = time.perf_counter()
    mask = tumor
    if liver is not None:
        # Predicted tumour keeps label 2 even outside the given liver: the mask shows what the
        # network found; it does not silently drop voxels.
        mask = np.where(tumor > 0, LABEL_TUMOR, np.where(liver, LABEL_LIVER, 0)).astype(np.uint8)
    rows = lesion_table(tumor, volume.spacing, volume.affine)
    # The liver the lesions are placed against: the cascade's prediction, else the input's label.
    stats_liver, liver_source = None, None
    if predicted_liver is not None:
        stats_liver, liver_source = predicted_liver, "predicted (liver stage)"
    elif volume.label is not None and np.any(volume.label > 0):
        stats_liver, liver_source = volume.label > 0, "input label"
    confidence = lesion_confidence(tumor, volume.spacing, probability=probability, uncertainty=uncertainty,
                                   votes=votes, n_members=len(models), liver=stats_liver)
    assert [c["voxels"] for c in confidence] == [r["voxels"] for r in rows]  # the same lesions, same order
    rows = [{**row, **{k: v for k, v in conf.items() if k != "voxels"}} for row, conf in zip(rows, confidence)]
    if uncertainty is None:  # one member without TTA: no spread, 0 by definition
        rows = [{**row, "mean_uncertainty": 0.0} for row in rows]
    summary = _summary(tumor, volume.spacing, predicted_liver, len(rows))
    target = None if volume.label is None else volume.label == LABEL_TUMOR
    metrics = None
    if target is not None:
        from hepaseg.evaluation import volume_metrics

        metrics = {"case_id": volume.case_id, **volume_metrics(tumor > 0, target, volume.spacing)}
        if cascade is not None:
            metrics["tumor"] = {k: v for k, v in metrics.items() if k != "case_id"}
            metrics["liver"] = volume_metrics(cascade.liver > 0, volume.label > 0, volume.spacing)
        # The same summary for the reference (liver volume and burden beside the cascade's).
        reference = _summary(target, volume.spacing, volume.label > 0 if cascade is not None else None, 0)
        metrics["summary"] = {**summary, **{f"reference_{k}": v for k, v in reference.items() if k != "n_lesions"}}
    settings = {
        "engine": engine,
        "model": model_name,
        "model_options": model_options,
        "data_options": data_options,
        "threshold": float(threshold),
        "tta": bool(tta),
        "checkpoints": [str(c) for c in checkpoints] if onnx_model is None else [],
        "n_members": len(models),
        "uncertainty": UNCERTAINTY_DEFINITION,
        "postprocess": {"applied": postprocess.describe(),
                        **{k: v for k, v in postprocess_info.items() if k != "settings"}, **postprocess.as_dict()},
        "lesion_liver": liver_source,
        "batch": batch,
        "labels": labels,
        "connectivity": 26,
        "hepaseg_version": __version__,
        "label_note": label_note,
        "orientation": {"canonical": CANONICAL_DESCRIPTION, **(geometry.as_dict() if geometry is not None else {})},
    }
    if cascade is not None:
        settings["cascade"] = {
            "liver_checkpoint": str(liver_checkpoints[0]) if len(liver_checkpoints) == 1 else
            [str(c) for c in liver_checkpoints],
            "liver_members": len(liver_checkpoints),
            "liver_model": liver_loaded.model_name,
            "liver_model_options": dict(liver_loaded.model_options[0]),
            "liver_data_options": dict(liver_loaded.data_options),
            "liver_threshold": 0.5,
            "largest_component": True,
            "keep_margin_mm": KEEP_MARGIN_MM,
            "crop_box": None if cascade.crop_box is None else list(cascade.crop_box),
            "tumor_slices": None if cascade.tumor_slices is None else list(cascade.tumor_slices),
            "liver_voxels": int(np.count_nonzero(cascade.liver)),
        }
    names = {"mask": "tumor_mask.nii.gz", "lesions_csv": "lesions.csv", "lesions_json": "lesions.json",
             "overlay": "overlay.png"}
    if metrics is not None:
        names["metrics"] = "metrics.json"
    if cascade is not None:
        names["liver_mask"] = "liver_mask.nii.gz"
    if save_probabilities:
        names.update(tumor_probability=PROBABILITY_FILES[0], tumor_uncertainty=PROBABILITY_FILES[1])
        if cascade is not None:
            names["liver_probability"] = PROBABILITY_FILES[2]
        if len(models) == 1 and not tta:
            warnings.append("one member without --tta: tumor_uncertainty.nii.gz is 0 everywhere (the uncertainty "
                            "is the spread over members and flips); add --tta or more --checkpoint")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        write_label_nifti(mask, volume, tmp / names["mask"])
        if cascade is not None:
            write_label_nifti(cascade.liver, volume, tmp / names["liver_mask"])
        if save_probabilities:
            write_probability_nifti(probability, volume, tmp / names["tumor_probability"])
            write_probability_nifti(uncertainty, volume, tmp / names["tumor_uncertainty"])
            if cascade is not None:
                write_probability_nifti(cascade.liver_probability, volume, tmp / names["liver_probability"])
        write_text_atomic(tmp / names["lesions_csv"], lesions_to_csv(rows))
        write_json_atomic(
            tmp / names["lesions_json"],
            json_safe({"case_id": volume.case_id, "source": source, "shape": list(volume.shape),
                       "spacing_mm": [float(s) for s in volume.spacing], "settings": settings, "warnings": warnings,
                       "summary": summary, "lesions": rows}),
        )
        draw_overlay(volume.image, tumor, tmp / names["overlay"], gt_mask=target, spacing=volume.spacing,
                     title=volume.case_id)
        if metrics is not None:
            write_json_atomic(tmp / names["metrics"], json_safe({**metrics, "settings": settings}))
        _check_out_dir(out_dir, overwrite)  # again: something may have appeared meanwhile
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["write"] = time.perf_counter() - t0
    return PredictResult(
        out_dir=out_dir,
        paths={key: out_dir / name for key, name in names.items()},
        lesions=rows,
        metrics=metrics,
        timings=timings,
        summary=summary,
        case_id=volume.case_id,
        shape=volume.shape,
        spacing=tuple(float(s) for s in volume.spacing),
        engine=engine,
        model_name=model_name,
        settings=settings,
        warnings=warnings,
    )


def _read_case(path: Path) -> tuple[Any, str | None]:
    """Read a case with its label when it has one; without it when the label cannot be read.

    Prediction does not need labels (a LiTS test volume has none), so a missing or unreadable
    label only drops ``metrics.json``; the returned note says why.
    """
    try:
        return read_volume(path, with_label=True), None
    except HepasegError as with_label_error:
        volume = read_volume(path, with_label=False)  # an image problem raises its own error here
        return volume, f"labels not read: {with_label_error}"


def export_checkpoint(
    checkpoint: str | os.PathLike, onnx_path: str | os.PathLike, *, opset: int = 17
) -> Path:
    """Export a training checkpoint to ONNX with its data options and model name as metadata.

    Returns:
        ``onnx_path``.
    """
    from hepaseg.training import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    opts = parse_data_options(loaded.data_options, source=f"{checkpoint}: data options")
    return export_onnx(
        loaded.model,
        onnx_path,
        in_channels=loaded.in_channels,
        size=opts.size,
        opset=opset,
        metadata={
            "model_name": loaded.model_name,
            "model_options": loaded.model_options,
            "data_options": loaded.data_options,
            "num_classes": loaded.num_classes,
            "base_width": loaded.base_width,
            "metrics": loaded.metrics,
            "checkpoint_version": loaded.version,
            "hepaseg_version": __version__,
        },
    )
