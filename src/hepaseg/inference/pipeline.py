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

``output_format`` (``--format``) ``"dicom-seg"`` writes, instead of the NIfTI masks, and
``"both"`` in addition to them (DICOM inputs only)::

    OUT_DIR/segmentation.dcm    a BINARY DICOM-SEG referencing the source series: a tumour
                                segment (and a liver segment after a cascade), see
                                hepaseg.io.dicom_seg.write_seg

Every file is written into a temporary folder beside ``OUT_DIR`` that is renamed
into place at the end, so ``OUT_DIR`` is either complete or untouched; it carries the
marker ``OUT_DIR/.hepaseg-output.json``, and ``overwrite`` replaces only a folder with
that marker (never one that holds, or lies inside, an input).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings as pywarnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hepaseg import __version__
from hepaseg.errors import HepasegError
from hepaseg.evaluation.detection import label_lesions_cropped
from hepaseg.evaluation.evaluate import check_threshold, json_safe
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
    DicomOptions,
    atomic_dir,
    check_output_dir,
    check_output_file,
    read_volume,
    write_json_atomic,
    write_label_nifti,
    write_output_marker,
    write_probability_nifti,
    write_text_atomic,
)

__all__ = [
    "LABEL_MODES",
    "OUTPUT_FILES",
    "OUTPUT_FORMATS",
    "LoadedModels",
    "PredictResult",
    "check_ct_image",
    "export_checkpoint",
    "load_models",
    "predict_case",
]

OUTPUT_FILES = ("tumor_mask.nii.gz", "lesions.csv", "lesions.json", "overlay.png", "metrics.json")
PROBABILITY_FILES = ("tumor_probability.nii.gz", "tumor_uncertainty.nii.gz", "liver_probability.nii.gz")
UNCERTAINTY_DEFINITION = (
    "standard deviation (ddof 0) of the tumour probability over the ensemble members x flips, computed at the "
    "network's resolution and resized bilinearly like the probability; 0 for one member without --tta"
)
LABEL_MODES = ("tumor", "lits")
OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")
SEG_FILE = "segmentation.dcm"
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
        timings: seconds for ``read``, ``inference`` and ``write`` (and ``load_model``); the write step's
            parts as ``write_lesions`` (lesion table and confidence columns), ``write_metrics``,
            ``write_volumes``, ``write_tables`` and ``write_overlay``.
        case_id, shape (z, y, x), spacing (mm, z y x), engine (``torch``/``onnx``), model_name.
        warnings: problems worth telling the user (cascade: no liver found); also in lesions.json.
        summary: ``n_lesions``, ``tumor_volume_ml`` and, after a cascade, ``liver_volume_ml`` and
            ``tumor_burden_percent`` (tumour voxels inside the predicted liver / liver voxels x 100).
        volume, tumor, liver: the case as read (canonical orientation, HU, with its label) and the
            predicted ``(z, y, x)`` uint8 masks (liver: cascade only), for reports (hepaseg.viz).
        uncertainty: ``(z, y, x)`` float32 sd of the tumour probability over members and flips, or
            None when there is no spread (one member without TTA).
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
    volume: Any = field(default=None, repr=False)
    tumor: np.ndarray | None = field(default=None, repr=False)
    liver: np.ndarray | None = field(default=None, repr=False)
    uncertainty: np.ndarray | None = field(default=None, repr=False)


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


@dataclass
class LoadedModels:
    """The networks of one prediction setup, loaded once (a batch reuses them for every case).

    Attributes:
        models: the tumour stage's networks: one ONNX model, one checkpoint's network, or the
            members of an ensemble (several checkpoints sharing their data options), averaged.
        data_options, engine, model_name, model_options: the tumour stage (the first member's
            model options; ``model_name`` is e.g. ``"mfcnet x3"`` for three members).
        checkpoints: the tumour checkpoints (``[]`` for the onnx engine).
        liver: the liver stage (cascade) as an :class:`~hepaseg.inference.ensemble.Ensemble` of one
            or more members, or None; ``liver_checkpoints`` its files.
        tumor_source: ``"--checkpoint PATH[, PATH...]"`` / ``"--model PATH"`` for messages.
        sha256: SHA-256 of the tumour checkpoint (or ONNX) file, comma-joined over the members of an
            ensemble; with a cascade ``liver_sha256`` likewise (written into a DICOM-SEG's algorithm
            identification and into ``batch.json``).
        seconds: time spent loading.
    """

    models: list
    data_options: dict
    engine: str
    model_name: str
    model_options: dict
    checkpoints: list[str] = field(default_factory=list)
    liver: Any = None
    liver_checkpoints: list[str] = field(default_factory=list)
    tumor_source: str = ""
    sha256: str = ""
    liver_sha256: str | None = None
    seconds: float = 0.0

    @property
    def model(self) -> Any:
        """The first (for one checkpoint or ONNX: the only) tumour network."""
        return self.models[0]

    @property
    def liver_checkpoint(self) -> str | None:
        """The first liver-stage checkpoint, or None without a cascade."""
        return self.liver_checkpoints[0] if self.liver_checkpoints else None


def load_models(
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    onnx_model: str | os.PathLike | None = None,
    liver_checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> LoadedModels:
    """Load the tumour model(s) (checkpoints or ONNX) and, for a cascade, the liver stage; check they fit.

    ``checkpoint`` and ``liver_checkpoint`` each take one path or several (an ensemble whose members
    must share their data options, :func:`~hepaseg.inference.ensemble.load_ensemble`).

    Raises:
        HepasegError: a missing/corrupt file, members with different data options, a liver-cropped
            tumour checkpoint without a liver stage, or two stages that do not form a cascade.
    """
    t0 = time.perf_counter()
    checkpoints, liver_checkpoints = _paths(checkpoint), _paths(liver_checkpoint)
    if onnx_model is not None or len(checkpoints) <= 1:
        model, data_options, engine, model_name, model_options = _load_engine(
            checkpoints[0] if checkpoints else None, onnx_model)
        members = [model]
    else:
        ensemble = load_ensemble(checkpoints, option="--checkpoint")
        members, data_options, engine = list(ensemble.models), dict(ensemble.data_options), "torch"
        model_name, model_options = ensemble.model_name, dict(ensemble.model_options[0])
    tumor_source = (f"--model {onnx_model}" if onnx_model is not None
                    else f"--checkpoint {', '.join(map(str, checkpoints))}")
    liver_loaded = None
    if not liver_checkpoints:
        require_liver_stage(data_options, source=tumor_source)
    else:
        liver_loaded = load_ensemble(liver_checkpoints, option="--liver-checkpoint")
        check_cascade(liver_loaded.data_options, data_options,
                      liver_source=f"--liver-checkpoint {liver_checkpoints[0]}", tumor_source=tumor_source)
    hashed = [onnx_model] if onnx_model is not None else checkpoints
    return LoadedModels(
        models=members, data_options=data_options, engine=engine, model_name=model_name,
        model_options=model_options, checkpoints=[] if onnx_model is not None else [str(c) for c in checkpoints],
        liver=liver_loaded, liver_checkpoints=[str(c) for c in liver_checkpoints], tumor_source=tumor_source,
        sha256=",".join(_sha256(p) for p in hashed),
        liver_sha256=",".join(_sha256(p) for p in liver_checkpoints) if liver_checkpoints else None,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    output_format: str = "nifti",
    dicom: DicomOptions | None = None,
    models: LoadedModels | None = None,
    compile: bool = False,
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
        overwrite: replace an ``out_dir`` that holds an earlier ``predict`` output (its marker);
            any other non-empty folder is refused.
        progress: show a progress bar over slices.
        device: torch device (default CUDA when available); ignored by the onnx engine.
        precision: torch autocast precision (see :func:`predict_volume`; default ``"auto"``).
        save_probabilities: also write the probability and uncertainty NIfTIs (module docstring).
        postprocess: :class:`~hepaseg.inference.postprocess.PostProcess` applied to the tumour mask
            (default None: none).
        output_format: ``"nifti"`` (default), ``"dicom-seg"`` or ``"both"``; a SEG needs a DICOM input.
        dicom: series choice and SEG labels of a DICOM input (``--series``, ``--seg``, ``--seg-labels``).
        models: networks already loaded by :func:`load_models` (batch prediction; one model or an
            ensemble); then ``checkpoint``/``onnx_model``/``liver_checkpoint`` are not read again.
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
    threshold = _check_options(labels, threshold, batch, output_format)
    postprocess = postprocess or PostProcess()
    if models is not None:
        checkpoints, liver_checkpoints = [Path(c) for c in models.checkpoints], [
            Path(c) for c in models.liver_checkpoints]
    else:
        checkpoints, liver_checkpoints = _paths(checkpoint), _paths(liver_checkpoint)
    if postprocess.needs_liver and not liver_checkpoints:
        postprocess_mask(np.zeros((1, 1, 1)), (1, 1, 1), postprocess)  # raises the one-line error
    input_path, out_dir = Path(input_path), Path(out_dir)
    inputs = [input_path, *checkpoints, onnx_model, *liver_checkpoints]
    # Before the slow parts: only an earlier predict output is replaced (with --overwrite), and
    # never a folder holding (or inside) an input.
    check_output_dir(out_dir, command="predict", inputs=inputs, overwrite=overwrite)
    timings: dict[str, float] = {}
    if models is None:
        models = load_models(checkpoints, onnx_model, liver_checkpoints)
        timings["load_model"] = models.seconds

    t0 = time.perf_counter()
    volume, label_note, given_liver = _read_checked(input_path, dicom, models, labels, output_format)
    timings["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    found = _predict_tumour(volume, models, batch=batch, tta=tta, threshold=threshold, device=device,
                            precision=precision, progress=progress, compile=compile,
                            save_probabilities=save_probabilities, postprocess=postprocess, timings=timings)
    timings["inference"] = time.perf_counter() - t0
    liver = given_liver
    if labels == "lits" and found.cascade is not None:
        liver = found.cascade.liver > 0  # predicted liver; tumour lies within 5 mm of it
    warnings = _case_warnings(volume, found.cascade, models.data_options)

    t0 = time.perf_counter()
    rows, liver_source = _lesion_rows(volume, found, n_members=len(models.models))
    timings["write_lesions"] = time.perf_counter() - t0
    summary = _summary(found.tumor, volume.spacing, found.predicted_liver, len(rows))
    t1 = time.perf_counter()
    metrics = _case_metrics(volume, found, summary)
    timings["write_metrics"] = time.perf_counter() - t1
    settings = _settings(models, volume, found, checkpoints=checkpoints, liver_checkpoints=liver_checkpoints,
                         threshold=threshold, tta=tta, postprocess=postprocess, liver_source=liver_source, batch=batch,
                         labels=labels, label_note=label_note, output_format=output_format)
    names = _output_names(metrics is not None, found.cascade is not None, output_format, save_probabilities)
    if save_probabilities and len(models.models) == 1 and not tta:
        warnings.append("one member without --tta: tumor_uncertainty.nii.gz is 0 everywhere (the uncertainty "
                        "is the spread over members and flips); add --tta or more --checkpoint")
    with atomic_dir(out_dir) as tmp:  # removed on any error or SIGTERM; the user's permissions, not 0700
        write_output_marker(tmp, "predict")
        _write_outputs(tmp, names, volume, found, liver, models, threshold=threshold, source=str(input_path),
                       settings=settings, warnings=warnings, summary=summary, rows=rows, metrics=metrics,
                       timings=timings)
        # Again: something may have appeared meanwhile.
        check_output_dir(out_dir, command="predict", inputs=inputs, overwrite=overwrite)
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
        engine=models.engine,
        model_name=models.model_name,
        settings=settings,
        warnings=warnings,
        volume=volume,
        tumor=found.tumor,
        liver=found.predicted_liver,
        uncertainty=found.uncertainty if len(models.models) > 1 or tta else None,
    )


def _check_options(labels: str, threshold: float, batch: int, output_format: str) -> float:
    """Check the plain options of :func:`predict_case`; returns the checked threshold."""
    if labels not in LABEL_MODES:
        raise HepasegError(f"--labels: expected one of {', '.join(LABEL_MODES)}, got {labels!r}")
    threshold = check_threshold(threshold)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise HepasegError(f"--batch: expected a positive integer, got {batch!r}")
    if output_format not in OUTPUT_FORMATS:
        raise HepasegError(f"--format: expected one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    return threshold


def _read_checked(input_path: Path, dicom: DicomOptions | None, models: LoadedModels, labels: str,
                  output_format: str) -> tuple[Any, str | None, np.ndarray | None]:
    """Read the case and check it against the model: (volume, label note, the input's liver for
    ``labels="lits"`` without a liver stage, else None)."""
    volume, label_note = _read_case(input_path, dicom)
    source = str(input_path)
    if output_format != "nifti":
        _check_seg_output(volume, source)
    check_ct_image(volume.image, source)
    check_volume_for_model(volume.image, models.data_options, model=models.model, source=source)
    liver = None
    if labels == "lits" and models.liver is None:
        if volume.label is None or not np.any(volume.label > 0):
            raise HepasegError(
                f"{source}: --labels lits needs a liver mask: expected the input to carry a label map with "
                "liver (1), got none. Use --labels tumor, or pass a labelled case (LiTS/MSD/3D-IRCADb)"
            )
        liver = volume.label > 0  # liver including tumour
    return volume, label_note, liver


@dataclass
class _Found:
    """What the network(s) found in one case, at the scan's resolution (arrays ``(z, y, x)``)."""

    tumor: np.ndarray  # uint8 {0, 1}, post-processed
    postprocess_info: dict[str, Any]
    probability: np.ndarray  # float32 tumour probability
    uncertainty: np.ndarray | None  # float32 spread over members and flips (None: none to spread over)
    votes: np.ndarray | None  # members voting tumour (None: one member)
    cascade: Any = None  # CascadeResult with the liver stage, else None

    @property
    def predicted_liver(self) -> np.ndarray | None:
        return self.cascade.liver if self.cascade is not None else None


def _predict_tumour(volume, models: LoadedModels, *, batch: int, tta: bool, threshold: float, device: str | None,
                    precision: str, progress: bool, compile: bool, save_probabilities: bool, postprocess: PostProcess,
                    timings: dict[str, float]) -> _Found:
    """The tumour of ``volume``: the ensemble (or the liver-first cascade), thresholded and post-processed."""
    members, data_options, liver_loaded = models.models, models.data_options, models.liver
    cascade = None
    if liver_loaded is None:
        # The spread needs two members or flips (one member without TTA has none: 0 by definition);
        # votes need two members.
        spread = len(members) > 1 or bool(tta)
        found = predict_ensemble(
            members, volume, data_options, batch=batch, tta=tta, threshold=threshold, device=device,
            precision=precision, progress=progress, uncertainty=spread, votes=len(members) > 1,
            compile=compile, timings=timings,
        )
        raw_tumor = found.mask(threshold)  # (z, y, x) uint8 {0, 1}
        probability, uncertainty, votes = found.probability, found.uncertainty, found.votes
        if uncertainty is None and save_probabilities:
            uncertainty = np.zeros(probability.shape, dtype=np.float32)
    else:
        cascade = predict_cascade(
            liver_loaded.models, liver_loaded.data_options, members, data_options, volume, batch=batch, tta=tta,
            threshold=threshold, device=device, precision=precision, progress=progress, details=True,
            compile=compile,
        )
        raw_tumor = cascade.tumor
        probability, uncertainty, votes = cascade.tumor_probability, cascade.tumor_uncertainty, cascade.tumor_votes
        timings.update({f"inference_{k}": v for k, v in cascade.timings.items()})
    predicted_liver = cascade.liver if cascade is not None else None
    tumor, postprocess_info = postprocess_mask(raw_tumor, volume.spacing, postprocess, liver=predicted_liver)
    return _Found(tumor=tumor, postprocess_info=postprocess_info, probability=probability, uncertainty=uncertainty,
                  votes=votes, cascade=cascade)


def _case_warnings(volume, cascade, data_options: dict[str, Any]) -> list[str]:
    """Warnings of the case: odd DICOM images left out, the cascade's, a checkpoint from before reorientation."""
    warnings = list(volume.meta.get("warnings", []))  # odd DICOM images left out of the series
    warnings += list(cascade.warnings) if cascade is not None else []
    geometry = volume.source_geometry
    if data_options.get("orientation") is None and geometry is not None and not geometry.is_identity:
        warnings.append(
            f"the checkpoint was trained on slices prepared before hepaseg sliced every source in one "
            f"orientation, and this {geometry.axcodes} input was reoriented to LPS: re-prepare and re-train"
        )
    return warnings


def _lesion_rows(volume, found: _Found, *, n_members: int) -> tuple[list[dict[str, Any]], str | None]:
    """One row per predicted lesion (size, place, confidence); and where the liver they are placed against
    came from (None: no liver)."""
    tumor = found.tumor
    components = label_lesions_cropped(tumor)  # once, for the table and the confidence columns
    rows = lesion_table(tumor, volume.spacing, volume.affine, components=components)
    # The liver the lesions are placed against: the cascade's prediction, else the input's label.
    stats_liver, liver_source = None, None
    if found.predicted_liver is not None:
        stats_liver, liver_source = found.predicted_liver, "predicted (liver stage)"
    elif volume.label is not None and np.any(volume.label > 0):
        stats_liver, liver_source = volume.label > 0, "input label"
    confidence = lesion_confidence(tumor, volume.spacing, probability=found.probability,
                                   uncertainty=found.uncertainty, votes=found.votes, n_members=n_members,
                                   liver=stats_liver, components=components)
    assert [c["voxels"] for c in confidence] == [r["voxels"] for r in rows]  # the same lesions, same order
    rows = [{**row, **{k: v for k, v in conf.items() if k != "voxels"}} for row, conf in zip(rows, confidence)]
    if found.uncertainty is None:  # one member without TTA: no spread, 0 by definition
        rows = [{**row, "mean_uncertainty": 0.0} for row in rows]
    return rows, liver_source


def _case_metrics(volume, found: _Found, summary: dict[str, Any]) -> dict[str, Any] | None:
    """Volume metrics (mm) of the tumour (and the cascade's liver) against the input's label; None without one."""
    if volume.label is None:
        return None
    from hepaseg.evaluation import volume_metrics

    target = volume.label == LABEL_TUMOR
    cascade = found.cascade
    metrics = {"case_id": volume.case_id, **volume_metrics(found.tumor > 0, target, volume.spacing)}
    if cascade is not None:
        metrics["tumor"] = {k: v for k, v in metrics.items() if k != "case_id"}
        metrics["liver"] = volume_metrics(cascade.liver > 0, volume.label > 0, volume.spacing)
    # The same summary for the reference (liver volume and burden beside the cascade's).
    reference = _summary(target, volume.spacing, volume.label > 0 if cascade is not None else None, 0)
    metrics["summary"] = {**summary, **{f"reference_{k}": v for k, v in reference.items() if k != "n_lesions"}}
    return metrics


def _settings(models: LoadedModels, volume, found: _Found, *, checkpoints: list[Path], liver_checkpoints: list[Path],
              threshold: float, tta: bool, postprocess: PostProcess, liver_source: str | None, batch: int, labels: str,
              label_note: str | None, output_format: str) -> dict[str, Any]:
    """Everything that decided this prediction (``lesions.json`` and ``metrics.json`` record it)."""
    geometry = volume.source_geometry
    settings = {
        "engine": models.engine,
        "model": models.model_name,
        "model_options": models.model_options,
        "data_options": models.data_options,
        "threshold": float(threshold),
        "tta": bool(tta),
        "checkpoints": [str(c) for c in checkpoints] if models.engine == "torch" else [],
        "n_members": len(models.models),
        "uncertainty": UNCERTAINTY_DEFINITION,
        "postprocess": {"applied": postprocess.describe(),
                        **{k: v for k, v in found.postprocess_info.items() if k != "settings"},
                        **postprocess.as_dict()},
        "lesion_liver": liver_source,
        "batch": batch,
        "labels": labels,
        "connectivity": 26,
        "hepaseg_version": __version__,
        "label_note": label_note,
        "output_format": output_format,
        "orientation": {"canonical": CANONICAL_DESCRIPTION, **(geometry.as_dict() if geometry is not None else {})},
    }
    if "series" in volume.meta:  # DICOM: which series was used, and why
        settings["series"] = {**volume.meta["series"], "choice": volume.meta.get("series_choice")}
    cascade, liver_loaded = found.cascade, models.liver
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
    return settings


def _output_names(has_metrics: bool, has_cascade: bool, output_format: str, save_probabilities: bool) -> dict[str, str]:
    """``{key: file name}`` of the outputs this prediction writes."""
    names = {"mask": "tumor_mask.nii.gz", "lesions_csv": "lesions.csv", "lesions_json": "lesions.json",
             "overlay": "overlay.png"}
    if has_metrics:
        names["metrics"] = "metrics.json"
    if has_cascade:
        names["liver_mask"] = "liver_mask.nii.gz"
    if output_format == "dicom-seg":
        names.pop("mask")
        names.pop("liver_mask", None)
    if output_format != "nifti":
        names["seg"] = SEG_FILE
    if save_probabilities:
        names.update(tumor_probability=PROBABILITY_FILES[0], tumor_uncertainty=PROBABILITY_FILES[1])
        if has_cascade:
            names["liver_probability"] = PROBABILITY_FILES[2]
    return names


def _write_outputs(tmp: Path, names: dict[str, str], volume, found: _Found, liver: np.ndarray | None,
                   models: LoadedModels, *, threshold: float, source: str, settings: dict[str, Any],
                   warnings: list[str], summary: dict[str, Any], rows: list[dict[str, Any]],
                   metrics: dict[str, Any] | None, timings: dict[str, float]) -> None:
    """Write every file of ``names`` into the temporary folder ``tmp`` (renamed onto OUT by the caller).

    ``timings`` gets ``write_volumes`` (masks, SEG, probabilities), ``write_tables`` (CSV/JSON) and
    ``write_overlay`` in seconds.
    """
    t0 = time.perf_counter()
    tumor, cascade = found.tumor, found.cascade
    mask = tumor
    if liver is not None:
        # Predicted tumour keeps label 2 even outside the given liver: the mask shows what the
        # network found; it does not silently drop voxels.
        mask = np.where(tumor > 0, LABEL_TUMOR, np.where(liver, LABEL_LIVER, 0)).astype(np.uint8)
    if "mask" in names:
        write_label_nifti(mask, volume, tmp / names["mask"])
    if "liver_mask" in names:
        write_label_nifti(cascade.liver, volume, tmp / names["liver_mask"])
    if "seg" in names:
        _write_seg(tmp / names["seg"], volume, tumor, None if cascade is None else cascade.liver, models, threshold)
    if "tumor_probability" in names:
        write_probability_nifti(found.probability, volume, tmp / names["tumor_probability"])
        write_probability_nifti(found.uncertainty, volume, tmp / names["tumor_uncertainty"])
        if cascade is not None:
            write_probability_nifti(cascade.liver_probability, volume, tmp / names["liver_probability"])
    t1 = time.perf_counter()
    timings["write_volumes"] = t1 - t0
    write_text_atomic(tmp / names["lesions_csv"], lesions_to_csv(rows))
    write_json_atomic(
        tmp / names["lesions_json"],
        json_safe({"case_id": volume.case_id, "source": source, "shape": list(volume.shape),
                   "spacing_mm": [float(s) for s in volume.spacing], "settings": settings, "warnings": warnings,
                   "summary": summary, "lesions": rows}),
    )
    if metrics is not None:
        write_json_atomic(tmp / names["metrics"], json_safe({**metrics, "settings": settings}))
    t2 = time.perf_counter()
    timings["write_tables"] = t2 - t1
    target = None if volume.label is None else volume.label == LABEL_TUMOR
    draw_overlay(volume.image, tumor, tmp / names["overlay"], gt_mask=target, spacing=volume.spacing,
                 title=volume.case_id)
    timings["write_overlay"] = time.perf_counter() - t2


def _read_case(path: Path, dicom: DicomOptions | None = None) -> tuple[Any, str | None]:
    """Read a case with its label when it has one; without it when the label cannot be read.

    Prediction does not need labels (a LiTS test volume has none), so a missing or unreadable
    label only drops ``metrics.json``; the returned note says why. A SEG given with ``--seg``
    is different: the user asked for it, so its errors stop the prediction.
    """
    try:
        return read_volume(path, with_label=True, dicom=dicom), None
    except HepasegError as with_label_error:
        if dicom is not None and dicom.seg:
            raise
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("ignore")  # the first read already warned about dropped images
            volume = read_volume(path, with_label=False, dicom=dicom)  # an image problem raises its own error
        return volume, f"labels not read: {with_label_error}"


def _check_seg_output(volume, source: str) -> None:
    """Refuse ``--format dicom-seg|both`` before inference when the input cannot carry a SEG."""
    files = volume.meta.get("dicom_files")
    if not files or not volume.meta.get("sop_instance_uids"):
        raise HepasegError(
            f"--format: DICOM-SEG output needs a DICOM input: expected a DICOM series, got a {volume.kind} case "
            f"({source}). Use --format nifti"
        )
    if any("::" in str(f) for f in files):
        raise HepasegError(
            f"--format: {source}: DICOM-SEG output needs the source slices as files: expected an unpacked "
            "series, got a zip archive. Unpack it and predict on the folder, or use --format nifti"
        )
    import pydicom

    from hepaseg.io.dicom_seg import check_seg_source

    check_seg_source(pydicom.dcmread(files[0], stop_before_pixels=True), files[0])


def _write_seg(path: Path, volume, tumor: np.ndarray, liver: np.ndarray | None, models: LoadedModels,
               threshold: float) -> None:
    """The tumour (and cascade liver) masks, canonical ``(z, y, x)``, as a SEG on the source series."""
    from hepaseg.io.dicom_seg import write_seg

    def to_source(mask: np.ndarray) -> np.ndarray:
        # Volumes in canonical orientation map back to the series' stacked slice order.
        return volume.to_source(mask) if hasattr(volume, "to_source") else mask

    segments = [("tumor", to_source(tumor))]
    if liver is not None:
        segments.append(("liver", to_source(liver)))
    algorithm = {"version": __version__, "name": models.model_name, "checkpoint_sha256": models.sha256,
                 "threshold": f"{float(threshold):g}"}
    if models.liver is not None:
        algorithm.update({"liver_model": models.liver.model_name, "liver_checkpoint_sha256": models.liver_sha256})
    write_seg(path, segments, source_files=volume.meta["dicom_files"],
              sop_instance_uids=volume.meta["sop_instance_uids"], algorithm=algorithm,
              series_description=f"hepaseg {models.model_name}{' cascade' if liver is not None else ''}")


def export_checkpoint(
    checkpoint: str | os.PathLike, onnx_path: str | os.PathLike, *, opset: int = 17
) -> Path:
    """Export a training checkpoint to ONNX with its data options and model name as metadata.

    ``onnx_path`` is checked first: a writable file path apart from the checkpoint; an existing
    file there is replaced only when it is an earlier ``hepaseg export`` (ONNX producer "hepaseg").

    Returns:
        ``onnx_path``.
    """
    from hepaseg.training import load_checkpoint

    check_output_file(onnx_path, option="--onnx", inputs=[checkpoint])
    if Path(onnx_path).is_file() and not _is_hepaseg_onnx(Path(onnx_path)):
        raise HepasegError(
            f"{onnx_path}: --onnx exists and is not an ONNX file written by `hepaseg export`: expected a new file "
            "name or an earlier export. hepaseg replaces only its own outputs: delete or move the file yourself, "
            "or choose another --onnx"
        )
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


def _is_hepaseg_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX model that ``hepaseg export`` wrote (its producer_name)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False).producer_name == "hepaseg"
    except Exception:  # noqa: BLE001 -- protobuf raises several types for a file that is not ONNX
        return False
