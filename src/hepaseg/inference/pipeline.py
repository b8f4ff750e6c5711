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

``labels="lits"`` then takes the liver from that prediction (not from the input's label);
``metrics.json`` (labelled input) adds ``liver`` (vs label > 0) and ``tumor`` (vs label == 2)
sections, the flat keys staying the tumour's; ``lesions.json`` carries a ``warnings`` list
(e.g. no liver found: the tumour mask is empty), which the CLI prints.

Every file is written into a temporary folder beside ``OUT_DIR`` that is renamed
into place at the end, so ``OUT_DIR`` is either complete or untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hepaseg import __version__
from hepaseg.errors import HepasegError
from hepaseg.inference.cascade import KEEP_MARGIN_MM, check_cascade, predict_cascade, require_liver_stage
from hepaseg.inference.lesions import lesion_table, lesions_to_csv
from hepaseg.inference.onnx_engine import OnnxModel, export_onnx
from hepaseg.inference.overlay import draw_overlay
from hepaseg.inference.predictor import check_volume_for_model, predict_volume
from hepaseg.inference.preprocess import parse_data_options
from hepaseg.io import (
    LABEL_LIVER,
    LABEL_TUMOR,
    read_volume,
    replace_dir,
    write_json_atomic,
    write_label_nifti,
    write_text_atomic,
)

__all__ = ["LABEL_MODES", "OUTPUT_FILES", "PredictResult", "check_ct_image", "export_checkpoint", "predict_case"]

OUTPUT_FILES = ("tumor_mask.nii.gz", "lesions.csv", "lesions.json", "overlay.png", "metrics.json")
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
        lesions: :func:`~hepaseg.inference.lesions.lesion_table` rows, largest first.
        metrics: volume metrics of the predicted tumour vs the input's label == 2, or None.
        timings: seconds for ``read``, ``inference`` and ``write`` (and ``load_model``).
        case_id, shape (z, y, x), spacing (mm, z y x), engine (``torch``/``onnx``), model_name.
        warnings: problems worth telling the user (cascade: no liver found); also in lesions.json.
    """

    out_dir: Path
    paths: dict[str, Path]
    lesions: list[dict]
    metrics: dict[str, Any] | None
    timings: dict[str, float]
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


def predict_case(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    onnx_model: str | os.PathLike | None = None,
    liver_checkpoint: str | os.PathLike | None = None,
    batch: int = 8,
    tta: bool = False,
    threshold: float = 0.5,
    labels: str = "tumor",
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    precision: str = "auto",
    compile: bool = False,
) -> PredictResult:
    """Predict the liver tumours of one CT case and write the results folder (see module docstring).

    Args:
        input_path: a CT case (LiTS/MSD/NIfTI/DICOM/3D-IRCADb/MRC; see ``read_volume``). Labels are
            read when the format has them (LiTS, MSD, 3D-IRCADb, MRC) and give ``metrics.json``.
        out_dir: output folder; must be new or empty unless ``overwrite``.
        checkpoint: a ``hepaseg train`` checkpoint (torch engine).
        onnx_model: an ``hepaseg export`` file (onnx engine; takes precedence over ``checkpoint``,
            whose data options are used only if the ONNX file has none).
        liver_checkpoint: a liver-stage checkpoint (``target == "liver"``): run the liver-first
            cascade (:mod:`hepaseg.inference.cascade`), with ``checkpoint``/``onnx_model`` as the
            tumour stage. Required for a tumour checkpoint trained with ``roi == "liver"``.
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
        compile: ``torch.compile`` the torch network(s) first (:func:`predict_volume`); the
            first batch pays the compilation, ``timings["first_batch"]`` says how long it took.

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
    input_path, out_dir = Path(input_path), Path(out_dir)
    _check_out_dir(out_dir, overwrite)  # fail before the slow parts
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model, data_options, engine, model_name, model_options = _load_engine(checkpoint, onnx_model)
    tumor_source = "--model" if onnx_model is not None else "--checkpoint"
    tumor_source = f"{tumor_source} {onnx_model if onnx_model is not None else checkpoint}"
    liver_loaded = None
    if liver_checkpoint is None:
        require_liver_stage(data_options, source=tumor_source)
    else:
        from hepaseg.training import load_checkpoint

        liver_loaded = load_checkpoint(liver_checkpoint)
        check_cascade(liver_loaded.data_options, data_options,
                      liver_source=f"--liver-checkpoint {liver_checkpoint}", tumor_source=tumor_source)
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
        tumor = predict_volume(
            model, volume, data_options, batch=batch, tta=tta, threshold=threshold, device=device,
            precision=precision, progress=progress, compile=compile, timings=timings,
        )  # (z, y, x) uint8 {0, 1}
    else:
        cascade = predict_cascade(
            liver_loaded.model, liver_loaded.data_options, model, data_options, volume, batch=batch, tta=tta,
            threshold=threshold, device=device, precision=precision, progress=progress, compile=compile,
        )
        tumor = cascade.tumor
        if labels == "lits":
            liver = cascade.liver > 0  # predicted liver; tumour lies within 5 mm of it
        timings.update({f"inference_{k}": v for k, v in cascade.timings.items()})
    timings["inference"] = time.perf_counter() - t0
    warnings = list(cascade.warnings) if cascade is not None else []

    t0 = time.perf_counter()
    mask = tumor
    if liver is not None:
        # Predicted tumour keeps label 2 even outside the given liver: the mask shows what the
        # network found; it does not silently drop voxels.
        mask = np.where(tumor > 0, LABEL_TUMOR, np.where(liver, LABEL_LIVER, 0)).astype(np.uint8)
    rows = lesion_table(tumor, volume.spacing, volume.affine)
    target = None if volume.label is None else volume.label == LABEL_TUMOR
    metrics = None
    if target is not None:
        from hepaseg.evaluation import volume_metrics

        metrics = {"case_id": volume.case_id, **volume_metrics(tumor > 0, target, volume.spacing)}
        if cascade is not None:
            metrics["tumor"] = {k: v for k, v in metrics.items() if k != "case_id"}
            metrics["liver"] = volume_metrics(cascade.liver > 0, volume.label > 0, volume.spacing)
    settings = {
        "engine": engine,
        "model": model_name,
        "model_options": model_options,
        "data_options": data_options,
        "threshold": float(threshold),
        "tta": bool(tta),
        "batch": batch,
        "labels": labels,
        "connectivity": 26,
        "hepaseg_version": __version__,
        "label_note": label_note,
    }
    if cascade is not None:
        settings["cascade"] = {
            "liver_checkpoint": str(liver_checkpoint),
            "liver_model": liver_loaded.model_name,
            "liver_model_options": dict(liver_loaded.model_options),
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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        write_label_nifti(mask, volume, tmp / names["mask"])
        if cascade is not None:
            write_label_nifti(cascade.liver, volume, tmp / names["liver_mask"])
        write_text_atomic(tmp / names["lesions_csv"], lesions_to_csv(rows))
        write_json_atomic(
            tmp / names["lesions_json"],
            {"case_id": volume.case_id, "source": source, "shape": list(volume.shape),
             "spacing_mm": [float(s) for s in volume.spacing], "settings": settings, "warnings": warnings,
             "lesions": rows},
        )
        draw_overlay(volume.image, tumor, tmp / names["overlay"], gt_mask=target, spacing=volume.spacing,
                     title=volume.case_id)
        if metrics is not None:
            write_json_atomic(tmp / names["metrics"], {**metrics, "settings": settings})
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
