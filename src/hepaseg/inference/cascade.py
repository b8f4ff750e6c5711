"""The liver-first cascade: find the liver, crop to it, segment the tumour inside it.

Two ordinary checkpoints make a cascade; no special training command is needed::

    hepaseg prepare SRC --target liver --size 128 --out prep_liver      # whole slices, with and without liver
    hepaseg train --data prep_liver --model unet --out runs/liver        # learns label > 0
    hepaseg prepare SRC --roi liver --size 224 --out prep_tumor         # tumour slices cropped to the liver box
    hepaseg train --data prep_tumor --model mfcnet --out runs/tumor
    hepaseg predict CT --checkpoint runs/tumor/best.ckpt --liver-checkpoint runs/liver/best.ckpt --out pred

(``hepaseg evaluate --volumes SRC --checkpoint runs/tumor/best.ckpt --liver-checkpoint
runs/liver/best.ckpt`` scores both stages.) Each checkpoint carries its own data options
(``target``, ``window``, ``size``, ``context_slices``, and ``roi``/``roi_margin_mm`` for the
tumour stage), and each stage is preprocessed with its own: the two windows and sizes may differ.

What :func:`predict_cascade` does with a ``(z, y, x)`` CT volume
----------------------------------------------------------------
1. Liver stage on every whole axial slice (:func:`~hepaseg.inference.predictor.predict_volume`),
   probability ``> liver_threshold`` (default 0.5) at the scan's resolution.
2. Keep the largest 3D connected component (26-connectivity, as the lesion table):
   the liver is one organ, so smaller blobs are false positives.
3. If nothing is left: an empty tumour mask and a warning; the tumour stage does not run.
4. The tumour stage's ROI: with ``roi == "liver"``, the square box of
   :func:`hepaseg.data.roi.liver_crop_box` around the predicted liver with the tumour
   checkpoint's ``roi_margin_mm`` -- exactly the rule ``prepare --roi liver`` applied to the
   labelled liver at training time. A tumour checkpoint trained on whole slices (no ``roi``)
   gets whole slices; only steps 5-7 then differ from a plain ``predict``.
5. The tumour stage runs on the slices that the KEPT REGION (step 7) touches, cropped to the box,
   with the ``K`` true neighbouring slices around them as context (as prepare stores them);
   probabilities are resized from ``size x size`` back to the box (bilinear) and thresholded at
   ``threshold`` there.
6. Pasted into a full-size zero volume at the box.
7. Tumour voxels farther than ``keep_margin_mm`` (default 5 mm) from the predicted liver are
   dropped: the kept region is the liver dilated by a spacing-aware (Euclidean distance in mm)
   ball, so a lesion on the liver's edge, which the liver stage may have partly missed,
   survives, while tumour-like tissue elsewhere in the abdomen does not.

Either stage may be an ensemble (a list of networks sharing their data options, e.g.
``--liver-checkpoint`` given several times): its probabilities are the mean over members and
flips (:mod:`hepaseg.inference.ensemble`). With ``details=True`` the result also carries the
probabilities behind both masks, the tumour stage's uncertainty and member votes, on the
volume's grid: the tumour probability is 0 where the tumour stage did not run (outside the
box and slices of step 5) and outside the kept region of step 7, so that
``tumor == (tumor_probability > threshold)`` exactly.

Validation (:func:`check_cascade`): the liver checkpoint must have ``target == "liver"`` and no
``roi``; the tumour checkpoint must have ``target == "tumor"`` (or none, as older checkpoints).
Both checkpoints' ``context_slices`` must fit the volume (checked by the predictor on each stage).
A tumour checkpoint trained with ``roi == "liver"`` is refused without a liver stage
(:func:`require_liver_stage`): whole slices would look nothing like its training data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cc3d
import edt
import numpy as np
from torch import nn

from hepaseg.data.roi import ROI_MODES, box_overlap, crop_slices, liver_crop_box
from hepaseg.errors import HepasegError
from hepaseg.evaluation.metrics import edt_threads
from hepaseg.inference.ensemble import as_model_list, predict_ensemble, vote_dtype
from hepaseg.inference.predictor import check_volume_for_model
from hepaseg.inference.preprocess import parse_data_options

__all__ = [
    "KEEP_MARGIN_MM",
    "CascadeResult",
    "check_cascade",
    "dilate_mm",
    "largest_component",
    "predict_cascade",
    "require_liver_stage",
]

#: Tumour voxels farther than this from the predicted liver (mm) are dropped.
KEEP_MARGIN_MM = 5.0
_NO_LIVER = (
    "liver stage found no liver (no voxel with liver probability > {thr:g}): the tumour mask is empty. "
    "Check that the input is an abdominal CT and that --liver-checkpoint is a trained liver stage"
)


@dataclass
class CascadeResult:
    """What :func:`predict_cascade` found.

    Attributes:
        liver: uint8 ``(z, y, x)`` {0, 1}: the largest 3D component of the liver stage's mask.
        tumor: uint8 ``(z, y, x)`` {0, 1}: tumour pasted back, within ``keep_margin_mm`` of the liver.
        warnings: human-readable problems (e.g. no liver found); empty when all went well.
        crop_box: ``(y0, y1, x0, x1)`` the tumour stage read (whole slice without ``roi``), or None
            when the tumour stage did not run.
        tumor_slices: ``(z0, z1)`` half-open range of slices the tumour stage predicted, or None.
        timings: seconds of the ``liver`` and ``tumor`` stages.
        liver_probability, tumor_probability: float32 ``(z, y, x)`` (``details=True``; else None).
        tumor_uncertainty: float32 ``(z, y, x)`` sd over tumour members and flips (``details=True``).
        tumor_votes: per-voxel bit field of the tumour members (``details=True``; see
            :class:`~hepaseg.inference.ensemble.EnsemblePrediction`).
        n_members: ``(liver members, tumour members)``.
    """

    liver: np.ndarray
    tumor: np.ndarray
    warnings: list[str] = field(default_factory=list)
    crop_box: tuple[int, int, int, int] | None = None
    tumor_slices: tuple[int, int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    liver_probability: np.ndarray | None = None
    tumor_probability: np.ndarray | None = None
    tumor_uncertainty: np.ndarray | None = None
    tumor_votes: np.ndarray | None = None
    n_members: tuple[int, int] = (1, 1)


def require_liver_stage(tumor_options: Mapping[str, Any], *, source: str = "--checkpoint") -> None:
    """Refuse to run a liver-cropped tumour checkpoint on whole slices (no liver stage given).

    Raises:
        HepasegError: when ``tumor_options["roi"]`` is set.
    """
    roi = tumor_options.get("roi")
    if roi is not None:
        raise HepasegError(
            f"{source}: this checkpoint was trained on liver-cropped slices (roi {roi!r}, `hepaseg prepare --roi "
            "liver`): expected a liver stage to find the liver first, got none. Pass --liver-checkpoint with a "
            "checkpoint trained on `hepaseg prepare --target liver` data"
        )


def check_cascade(
    liver_options: Mapping[str, Any],
    tumor_options: Mapping[str, Any],
    *,
    liver_source: str = "--liver-checkpoint",
    tumor_source: str = "--checkpoint",
) -> None:
    """Check that two checkpoints' data options form a liver -> tumour cascade.

    Sizes and context slices may differ (the liver stage works at a coarse size, each stage is
    preprocessed with its own options); the HU windows must agree: both stages read the same
    scan, and a liver stage windowed differently from its tumour stage is almost always a pair of
    checkpoints from two different datasets.

    Raises:
        HepasegError: windows that differ; a liver checkpoint whose ``target`` is not ``"liver"``
            or that was trained with an ``roi``; a tumour checkpoint whose ``target`` is not
            ``"tumor"``, or with an unknown ``roi`` or a bad ``roi_margin_mm``; missing or invalid
            window/size/context_slices.
    """
    parse_data_options(liver_options, source=f"{liver_source}: data options")
    parse_data_options(tumor_options, source=f"{tumor_source}: data options")
    liver_window = [float(v) for v in liver_options["window"]]
    tumor_window = [float(v) for v in tumor_options["window"]]
    if liver_window != tumor_window:
        raise HepasegError(
            f"{liver_source}: window {liver_window}: expected the tumour stage's window {tumor_window} "
            f"({tumor_source}): the two checkpoints disagree on their data options. Prepare both stages with "
            "the same --window and re-train the one that differs"
        )
    liver_target = liver_options.get("target", "tumor")
    if liver_target != "liver":
        raise HepasegError(
            f"{liver_source}: target {liver_target!r}: expected a liver-stage checkpoint (target 'liver', trained "
            f"on `hepaseg prepare --target liver` data), got one trained on {liver_target!r}. "
            "Did you swap --checkpoint and --liver-checkpoint?"
        )
    if liver_options.get("roi") is not None:
        raise HepasegError(
            f"{liver_source}: roi {liver_options['roi']!r}: expected a liver stage trained on whole slices (no "
            "--roi), got one trained on cropped slices: it cannot find the liver in a whole scan. "
            "Re-train it on `hepaseg prepare --target liver` data"
        )
    tumor_target = tumor_options.get("target", "tumor")
    if tumor_target != "tumor":
        raise HepasegError(
            f"{tumor_source}: target {tumor_target!r}: expected a tumour-stage checkpoint (target 'tumor'), got "
            f"one trained on {tumor_target!r}. Did you swap --checkpoint and --liver-checkpoint?"
        )
    roi = tumor_options.get("roi")
    if roi is not None and roi not in ROI_MODES:
        raise HepasegError(f"{tumor_source}: roi: expected one of {', '.join(ROI_MODES)} or none, got {roi!r}")
    if roi is not None:
        margin = tumor_options.get("roi_margin_mm")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise HepasegError(
                f"{tumor_source}: roi_margin_mm: expected a margin >= 0 in mm with roi {roi!r}, got {margin!r}. "
                "Re-train from a current `hepaseg prepare --roi liver` output"
            )


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a 3D mask (bool ``(z, y, x)``; all False when empty).

    Ties go to the component with the lowest label (first in C order). Labelled with cc3d on the
    mask's bounding box (numbered as ``ndimage.label``; several times faster on a whole scan).
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=bool)
    box = _bbox(mask)
    if box is None:
        return out
    labels, n = cc3d.connected_components(mask[box], connectivity=26, return_N=True)
    if n <= 1:
        out[box] = labels > 0
        return out
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out[box] = labels == int(np.argmax(sizes))
    return out


def dilate_mm(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Voxels within ``radius_mm`` (Euclidean, in mm, centre to centre) of a 3D mask.

    Computed inside the mask's bounding box grown by ``ceil(radius / spacing)`` voxels per axis
    (every voxel within the radius lies there), so a liver in a 512 x 512 x 800 scan does not
    need a full-volume distance transform, with the ``edt`` package's exact transform (float32
    squared distances; scipy's took 25-40 s on a whole 200 x 512 x 512 scan, this one seconds).
    A voxel at exactly ``radius_mm`` is inside; the comparison allows float32 rounding (1e-6
    relative), far below any real difference between two voxels' distances.

    Args:
        mask: ``(z, y, x)`` bool.
        spacing: ``(z, y, x)`` mm.
        radius_mm: >= 0.

    Returns:
        bool ``(z, y, x)``; the mask itself when ``radius_mm == 0``.
    """
    mask = np.asarray(mask, dtype=bool)
    if radius_mm < 0:
        raise ValueError(f"radius_mm: expected >= 0, got {radius_mm!r}")
    box = _bbox(mask)
    if box is None or radius_mm == 0:
        return mask.copy()
    grow = [math.ceil(radius_mm / float(s)) for s in spacing]
    big = tuple(slice(max(b.start - g, 0), min(b.stop + g, n)) for b, g, n in zip(box, grow, mask.shape))
    squared = edt.edtsq(~mask[big], anisotropy=tuple(float(s) for s in spacing), black_border=False,
                        parallel=edt_threads())  # mm^2
    out = np.zeros(mask.shape, dtype=bool)
    out[big] = squared <= float(radius_mm) ** 2 * (1.0 + 1e-6)
    return out


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box of a 3D mask as slices, or None when empty."""
    ranges = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        ranges.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(ranges)  # type: ignore[return-value]


def _slice_range(z0: int, z1: int, k: int, n_z: int, needed: int) -> tuple[int, int]:
    """``[z0 - k, z1 + k)`` clipped to the volume, widened to at least ``needed`` slices."""
    a, b = max(z0 - k, 0), min(z1 + k, n_z)
    while b - a < needed:  # the predictor needs max(2, 2K + 1) slices; the volume has them (checked)
        if a > 0:
            a -= 1
        else:
            b += 1
    return a, b


def predict_cascade(
    liver_model: nn.Module | Callable | Sequence,
    liver_options: Mapping[str, Any],
    tumor_model: nn.Module | Callable | Sequence,
    tumor_options: Mapping[str, Any],
    volume,
    *,
    batch: int = 8,
    tta: bool = False,
    threshold: float = 0.5,
    liver_threshold: float = 0.5,
    keep_margin_mm: float = KEEP_MARGIN_MM,
    device: str | None = None,
    precision: str = "auto",
    progress: bool = True,
    details: bool = False,
    compile: bool = False,
) -> CascadeResult:
    """Liver, then tumour inside it, for one CT volume (see the module docstring for the steps).

    Args:
        liver_model, liver_options: the liver stage (a network ``(N, 2K+1, S, S) -> (N, 1, S, S)``
            logits, or a list of them, and the checkpoint's data options, ``target == "liver"``).
        tumor_model, tumor_options: the tumour stage (``roi == "liver"`` for crops, or whole slices);
            a network or a list of them.
        volume: a :class:`hepaseg.io.Volume` (``image`` ``(z, y, x)`` HU and ``spacing`` mm).
        batch, tta, device, precision, progress, compile: as :func:`~hepaseg.inference.predict_volume`,
            for both stages.
        threshold: tumour probability threshold (default 0.5, strictly greater).
        liver_threshold: liver probability threshold (default 0.5).
        keep_margin_mm: tumour farther than this from the liver (mm) is dropped (default 5).
        details: also return the probabilities, the tumour uncertainty and member votes.

    Returns:
        :class:`CascadeResult` with uint8 ``liver`` and ``tumor`` masks of the volume's shape.

    Raises:
        HepasegError: checkpoints that do not form a cascade (:func:`check_cascade`), or a volume
            too thin for either stage's context slices.
    """
    liver_models, tumor_models = as_model_list(liver_model), as_model_list(tumor_model)
    image = np.asarray(volume.image)
    spacing = tuple(float(s) for s in volume.spacing)
    source = getattr(volume, "source", "") or getattr(volume, "case_id", "") or "input"
    liver_opts, tumor_opts = _check_stages(image, liver_models, liver_options, tumor_models, tumor_options,
                                           source=source)
    n_z, height, width = image.shape
    common = {"batch": batch, "tta": tta, "device": device, "precision": precision, "progress": progress,
              "compile": compile}
    n_members = (len(liver_models), len(tumor_models))

    t0 = time.perf_counter()
    liver_pred = predict_ensemble(liver_models, image, liver_opts, **common)
    liver = largest_component(liver_pred.probability > liver_threshold)
    timings = {"liver": time.perf_counter() - t0}
    tumor = np.zeros(image.shape, dtype=np.uint8)
    extra: dict[str, Any] = {"n_members": n_members}
    if details:
        extra.update(liver_probability=liver_pred.probability,
                     tumor_probability=np.zeros(image.shape, dtype=np.float32),
                     tumor_uncertainty=np.zeros(image.shape, dtype=np.float32),
                     tumor_votes=np.zeros(image.shape, dtype=vote_dtype(len(tumor_models))))
    del liver_pred
    if not liver.any():
        timings["tumor"] = 0.0
        return CascadeResult(liver.astype(np.uint8), tumor, [_NO_LIVER.format(thr=liver_threshold)],
                             timings=timings, **extra)

    t0 = time.perf_counter()
    keep = dilate_mm(liver, spacing, keep_margin_mm)
    box = _tumor_box(liver, spacing, tumor_opts)
    z_hit = np.flatnonzero(keep.any(axis=(1, 2)))
    z0, z1 = int(z_hit[0]), int(z_hit[-1]) + 1
    # The K true neighbours on each side serve as context, as in the prepared shards (the border
    # slice is repeated only at the volume's ends); their own predictions are discarded.
    a, b = _slice_range(z0, z1, tumor_opts.context_slices, n_z, max(2, tumor_opts.in_channels))
    crops = crop_slices(image, box, indices=np.arange(a, b))  # (b - a, side, side) HU
    found = predict_ensemble(tumor_models, crops, tumor_opts, uncertainty=details, votes=details,
                             threshold=threshold, **common)  # at the box's size
    # Only the box's part inside the image can hold tumour (0 elsewhere, as pasting into zero slices
    # gave): thresholding and storing work on that region of slices z0:z1, not on whole slices.
    rows, cols, crop_rows, crop_cols = box_overlap(box, height, width)
    region = (slice(z0, z1), rows, cols)
    kept = keep[region]
    crop_part = (slice(z0 - a, z1 - a), crop_rows, crop_cols)
    probability = np.where(kept, found.probability[crop_part], np.float32(0.0))  # 0 beyond keep_margin_mm
    tumor[region] = probability > threshold
    if details:
        extra["tumor_probability"][region] = probability
        extra["tumor_uncertainty"][region] = np.where(kept, found.uncertainty[crop_part], np.float32(0.0))
        extra["tumor_votes"][region] = np.where(kept, found.votes[crop_part], 0)
    timings["tumor"] = time.perf_counter() - t0
    return CascadeResult(
        liver=liver.astype(np.uint8),
        tumor=tumor,
        warnings=[],
        crop_box=tuple(int(v) for v in box),  # type: ignore[arg-type]
        tumor_slices=(z0, z1),
        timings=timings,
        **extra,
    )


def _check_stages(image: np.ndarray, liver_models: list, liver_options: Mapping[str, Any], tumor_models: list,
                  tumor_options: Mapping[str, Any], *, source: str):
    """(liver stage's, tumour stage's) options checked against the volume and every member of each stage."""
    check_cascade(liver_options, tumor_options)
    for member in liver_models:
        liver_opts = check_volume_for_model(image, liver_options, model=member, source=f"{source} (liver stage)")
    for member in tumor_models:
        tumor_opts = check_volume_for_model(image, tumor_options, model=member, source=f"{source} (tumour stage)")
    return liver_opts, tumor_opts


def _tumor_box(liver: np.ndarray, spacing: tuple[float, float, float], tumor_opts) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` pixels the tumour stage sees: the liver's crop box (``roi == "liver"``) or the slice."""
    if tumor_opts.get("roi") == "liver":
        box = liver_crop_box(liver, spacing, margin_mm=float(tumor_opts["roi_margin_mm"]))
        assert box is not None  # the liver is not empty here
        return box
    return (0, liver.shape[1], 0, liver.shape[2])
