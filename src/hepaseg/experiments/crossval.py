"""Leave-one-patient-out cross-validation for tiny data sets (``hepaseg crossval``).

With two to a handful of labelled patients (3D-IRCADb 1.1 and LiTS-117 are one patient each)
there is no test split to spare: every patient is held out once, a model is trained on the
others, and the held-out patient's WHOLE CT volume is predicted at its own resolution (exactly
as ``hepaseg predict``; with ``cascade=True`` the liver-first cascade of
:mod:`hepaseg.inference.cascade`) and scored. Repeating over ``seeds`` gives the training
noise; repeating over folds gives the (much larger) patient-to-patient spread.

Per held-out patient, model and seed (one row of ``crossval.csv``):

* 3D tumour Dice, Jaccard, RVD, ASSD, HD95, Hausdorff (mm) and the voxel counts from which
  the LiTS "Dice global" is pooled over the held-out patients
  (:func:`hepaseg.evaluation.volume_metrics`);
* per-slice Dice on the slices whose reference has tumour, at the scan's resolution;
* lesion-wise detection (:func:`hepaseg.evaluation.lesion_detection`): recall at IoU > 0.5 and
  at any overlap, overall and per largest-axial-diameter bin (< 10, 10-20, > 20 mm), and
  false-positive lesions (predicted lesions touching no reference lesion);
* the false-positive slice rate on tumour-free liver slices (:func:`hepaseg.evaluation.fp_slice_rate`);
* with the cascade, the liver Dice of the liver stage.

Layout of ``OUT``::

    OUT/.hepaseg-output.json             marker: a crossval folder (another non-empty folder is refused)
    OUT/protocol.json                    the pinned protocol (a later call must match it)
    OUT/prepared/tumor/, prepared/liver/ every patient prepared ONCE (all in "train"); liver/ only
                                         with the cascade (target liver, liver_size px)
    OUT/folds/<patient>/data-tumor/      the fold's training data: the OTHER patients only
    OUT/folds/<patient>/data-liver/      (cascade) the same for the liver stage
    OUT/folds/<patient>/liver-<net>/seed<k>/  (cascade) liver-stage run, shared by all tumour models
    OUT/folds/<patient>/<model>/seed<k>/ tumour-stage run (hepaseg train layout) + crossval.json
    OUT/crossval.csv                     one row per fold x seed x model, every metric
    OUT/lesions.csv                      one row per reference lesion of every fold x seed x model
    OUT/table.md                         mean ± sd over folds and seeds per model, recall per
                                         diameter bin, per-fold values, noise note, the command
    OUT/ensembles/<model>.json           every fold x seed last.ckpt of a model (and, with the cascade,
                                         every liver stage) as one ensemble list for new patients
                                         (`hepaseg predict --checkpoints-from`; hepaseg.evaluation.ensemble)

Protocol choices
----------------
* **No leak.** The held-out patient is never in its fold's training directory (neither its
  slices nor a validation block of it), so it influences neither training nor model choice.
  Preparing every patient once up front is equivalent to preparing the training patients per
  fold: preprocessing is per volume (window, resize, ROI from that volume's own label), with
  no statistic pooled over patients.
* **Validation without a validation patient.** Training needs a validation split, but with two
  patients LOPO leaves one training patient. Each training patient's kept slices are therefore
  cut along z (:func:`make_fold_data`): the last ``val_fraction`` (default 15 %, at least one
  slice) of its kept slices form a validation block, and the training block ends ``2K + 2`` z
  positions before it (as ``prepare --z-split``), so no context channel of a training slice
  shows a validation slice. That block is only MONITORED (val Dice in the training logs):
  the held-out patient is scored with ``last.ckpt``, never the best-validation checkpoint,
  because selecting on a block of the training patient would select for that patient.
  It costs the training block ``val_fraction`` of the slices plus the gap.
* **One liver stage per fold and seed** (cascade): trained on whole slices of the training
  patients at ``liver_size`` px with the default training options (only throughput and
  hardware options -- batch size, precision, accelerator, devices, workers -- are taken from
  ``train_options``), shared by every tumour model of that fold and seed, so the tumour
  variants of an ablation differ only in the tumour stage.

Resuming: a (fold, seed, model) whose ``crossval.json`` marker exists is not retrained or
re-scored; an interrupted run with ``last.ckpt`` continues with ``resume=True``; one killed
before its first checkpoint starts again. Rerun the same command to finish.

On a cluster (``--plan | --run-index I | --worker | --collect``, as ``hepaseg compare``):
:func:`crossval_plan` prepares every patient and every fold's training data once and writes
``OUT/plan.json`` -- per fold and seed the liver stage (cascade) and each tumour model;
:func:`crossval_run` runs one entry or, as a local worker, every free one (a tumour entry runs
its fold and seed's liver stage first unless another worker holds it, then waits for it);
:func:`crossval_collect` tabulates what has finished and names the rest. Runs are claimed in
``OUT/claims`` (:mod:`hepaseg.io.claims`), so no run is done twice and a killed worker's run is
resumed by the next.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import shlex
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hepaseg.errors import HepasegError
from hepaseg.evaluation.detection import DIAMETER_BINS, fp_slice_rate, lesion_detection, tumor_free_liver_slices
from hepaseg.evaluation.evaluate import check_threshold, json_safe
from hepaseg.evaluation.metrics import volume_metrics
from hepaseg.experiments.compare import (
    CLAIMS_DIR,
    PLAN_FILE,
    _check_protocol,
    parse_models,
    read_plan,
    run_plan,
    train_state,
)
from hepaseg.io import find_cases
from hepaseg.io.atomic import atomic_dir, write_csv_atomic, write_json_atomic, write_text_atomic
from hepaseg.io.claims import Claim, run_claimed
from hepaseg.io.outputs import check_output_dir, write_output_marker
from hepaseg.io.readers import DicomOptions
from hepaseg.io.volume import LABEL_TUMOR

__all__ = [
    "CROSSVAL_CSV_COLUMNS",
    "LESION_CSV_COLUMNS",
    "CrossvalResult",
    "case_metrics",
    "crossval",
    "crossval_collect",
    "crossval_plan",
    "crossval_run",
    "make_fold_data",
]

_MARKER = "crossval.json"  # a finished (fold, seed, model): training done and held-out patient scored
_STAGE_MARKER = "stage.json"  # a finished liver-stage run
# TrainConfig fields crossval sets itself; everything else may come in train_options.
_OWN_FIELDS = ("data", "model", "out", "seed", "width", "max_epochs", "max_minutes", "resume", "overwrite",
               "progress_bar", "target")
# prepare() arguments crossval sets itself; the rest (window, slices, context_slices, roi_margin_mm...)
# may come in prepare_options.
_OWN_PREPARE = ("sources", "out", "size", "split", "seed", "split_file", "z_split", "target", "roi", "overwrite",
                "progress", "console", "dicom")
# Options of the tumour stage that the liver stage shares: throughput and hardware, not the recipe.
_LIVER_SHARED = ("batch_size", "precision", "channels_last", "accelerator", "devices", "num_nodes", "strategy",
                 "num_workers", "deterministic")
_BIN_KEYS = {"<10": "lt10", "10-20": "10to20", ">20": "gt20"}

#: Columns of ``crossval.csv`` (fractions in [0, 1], distances in mm, counts in voxels/lesions/slices).
CROSSVAL_CSV_COLUMNS: tuple[str, ...] = (
    "model", "fold", "seed", "dice", "jaccard", "rvd", "assd", "hd95", "hausdorff",
    "intersection", "pred_voxels", "target_voxels", "slice_dice", "n_tumor_slices",
    "n_target_lesions", "n_pred_lesions", "found_iou", "found_any", "recall_iou", "recall_any", "fp_lesions",
    *(f"{k}_{b}" for b in _BIN_KEYS.values() for k in ("n_lesions", "found_iou", "found_any", "recall_iou",
                                                          "recall_any")),
    "fp_slice_rate", "n_free_liver_slices", "fp_slices", "liver_dice", "warnings",
    "train_slices", "val_slices", "epochs", "stopped_by_time", "train_wall_s", "predict_s", "checkpoint",
)
#: Columns of ``lesions.csv``: one reference lesion of one held-out patient, model and seed.
LESION_CSV_COLUMNS: tuple[str, ...] = (
    "model", "fold", "seed", "id", "voxels", "diameter_mm", "bin", "best_iou", "overlap_voxels", "found_iou",
    "found_any",
)
# (column, header, kind): kind "pct" shows 100 * value with 2 decimals, "num" 2 decimals.
_TABLE_METRICS = (
    ("dice", "Dice 3D (%)", "pct"),
    ("slice_dice", "per-slice Dice, tumour slices (%)", "pct"),
    ("recall_iou", "recall IoU>0.5 (%)", "pct"),
    ("recall_any", "recall any overlap (%)", "pct"),
    ("fp_lesions", "FP lesions / volume", "num"),
    ("fp_slice_rate", "FP rate, tumour-free liver slices (%)", "pct"),
    ("assd", "ASSD (mm)", "num"),
    ("hd95", "HD95 (mm)", "num"),
)


@dataclass
class CrossvalResult:
    """What :func:`crossval` produced.

    ``rows``: one dict per (fold, seed, model) (the rows of ``crossval.csv``); ``lesions``: one
    per reference lesion (``lesions.csv``); ``dice_global``: ``{model: [pooled Dice of seed 0,
    seed 1, ...]}`` over the held-out patients; ``trained``: ``(stage, fold, seed)`` runs trained
    or resumed in this call (stage = model name, or ``liver-<net>``).
    """

    out: Path
    models: list[str]
    seeds: list[int]
    folds: list[str]
    rows: list[dict[str, Any]]
    lesions: list[dict[str, Any]]
    dice_global: dict[str, list[float]]
    trained: list[tuple[str, str, int]]
    table: str
    protocol: dict[str, Any]
    command: str
    wall_seconds: float
    paths: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # planned tumour runs not finished (collect)


# --- metrics of one held-out patient ------------------------------------------------------------


def case_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    *,
    liver_pred: np.ndarray | None = None,
    iou_threshold: float = 0.5,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every crossval metric of one predicted case.

    Args:
        pred: predicted tumour mask ``(z, y, x)`` at the scan's resolution, 0/1 or bool.
        label: reference LiTS label map ``(z, y, x)``: 0 background, 1 liver, 2 tumour.
        spacing: voxel size in mm, ``(z, y, x)``.
        liver_pred: predicted liver ``(z, y, x)`` (cascade), scored against ``label > 0``.
        iou_threshold: lesion detection threshold (default 0.5).

    Returns:
        ``(row, lesions)``: ``row`` holds the :func:`volume_metrics` keys, ``slice_dice`` (mean
        Dice over the reference's tumour slices; NaN without any) and ``n_tumor_slices``, the
        detection counts and recalls (overall and ``*_lt10``, ``*_10to20``, ``*_gt20``),
        ``fp_lesions``, ``fp_slice_rate``, ``n_free_liver_slices``, ``fp_slices`` and
        ``liver_dice`` (NaN without ``liver_pred``); ``lesions`` are
        :func:`lesion_detection`'s per-lesion rows.
    """
    pred = np.asarray(pred) != 0
    label = np.asarray(label)
    target = label == LABEL_TUMOR
    row: dict[str, Any] = dict(volume_metrics(pred, target, spacing))

    # Per-slice Dice on the reference's tumour slices: 2|P & T| / (|P| + |T|), |T| > 0 there.
    flat_p, flat_t = pred.reshape(pred.shape[0], -1), target.reshape(target.shape[0], -1)
    tumor_z = np.flatnonzero(flat_t.any(axis=1))
    inter = np.count_nonzero(flat_p[tumor_z] & flat_t[tumor_z], axis=1)
    denom = np.count_nonzero(flat_p[tumor_z], axis=1) + np.count_nonzero(flat_t[tumor_z], axis=1)
    row["slice_dice"] = float(np.mean(2 * inter / denom)) if tumor_z.size else math.nan
    row["n_tumor_slices"] = int(tumor_z.size)

    det = lesion_detection(pred, target, spacing, iou_threshold=iou_threshold)
    row.update({
        "n_target_lesions": det["n_target"], "n_pred_lesions": det["n_pred"], "found_iou": det["found_iou"],
        "found_any": det["found_any"], "recall_iou": det["recall_iou"], "recall_any": det["recall_any"],
        "fp_lesions": det["fp_lesions"],
    })
    for name, _lo, _hi in DIAMETER_BINS:
        b, key = det["bins"][name], _BIN_KEYS[name]
        row.update({f"n_lesions_{key}": b["n"], f"found_iou_{key}": b["found_iou"],
                    f"found_any_{key}": b["found_any"], f"recall_iou_{key}": b["recall_iou"],
                    f"recall_any_{key}": b["recall_any"]})

    free = tumor_free_liver_slices(label)
    row["fp_slice_rate"] = fp_slice_rate(pred, label)
    row["n_free_liver_slices"] = int(free.size)
    row["fp_slices"] = int(np.count_nonzero(flat_p[free].any(axis=1))) if free.size else 0
    row["liver_dice"] = math.nan
    if liver_pred is not None:
        row["liver_dice"] = float(volume_metrics(np.asarray(liver_pred) != 0, label > 0, spacing)["dice"])
    return row, det["lesions"]


# --- the fold's training data -------------------------------------------------------------------


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def make_fold_data(
    pool: str | os.PathLike,
    dest: str | os.PathLike,
    held_out: str,
    *,
    val_fraction: float = 0.15,
) -> dict[str, Any]:
    """Write one fold's training data: every case of ``pool`` except ``held_out``, split along z.

    Each remaining case ``<id>`` becomes ``<id>-z:train`` and ``<id>-z:val``: the validation
    block is the last ``val_fraction`` of its kept slices (at least one), and its training
    block ends ``2K + 2`` z positions before it (``K`` = context slices; see the module
    docstring). Every per-slice array of the shard (leading dimension = the case's slice count:
    image, label, slice_index, ...) and the entry's ``kept_slices`` are cut the same way;
    ``tumor_pixels``/``liver_pixels`` are recounted. The manifest records ``crossval:
    {"held_out", "val_fraction", "gap", "pool"}`` and each entry its ``patient``. A patient too
    small to leave a training block before its validation block trains on all its slices.

    Args:
        pool: a prepared directory holding every patient (``hepaseg prepare`` output).
        dest: the fold's directory (must not exist); written atomically, manifest last.
        held_out: case id of the held-out patient; must be in ``pool``.
        val_fraction: share of each training patient's kept slices used for validation, in (0, 0.5].

    Returns:
        The fold manifest.

    Raises:
        HepasegError: unknown ``held_out``, or no training or no validation slice left.
    """
    from hepaseg.data import read_manifest
    from hepaseg.data.zval import split_case_along_z, z_val_gap

    pool, dest = Path(pool), Path(dest)
    if not 0.0 < float(val_fraction) <= 0.5:
        raise HepasegError(f"val_fraction: expected a fraction in (0, 0.5], got {val_fraction!r}")
    manifest = read_manifest(pool)
    ids = [c["id"] for c in manifest["cases"]]
    if held_out not in ids:
        raise HepasegError(f"{pool / 'manifest.json'}: held-out case {held_out!r} is not prepared: expected one of "
                           f"{', '.join(ids)}. Use a new --out")
    gap = z_val_gap(manifest["options"].get("context_slices", 0))
    cases: list[dict[str, Any]] = []
    with atomic_dir(dest) as tmp:
        (tmp / "cases").mkdir()
        for case in manifest["cases"]:
            if case["id"] == held_out:
                continue  # the fold's test patient: nothing of it is copied
            # The same rule as `hepaseg prepare --val-fraction` (hepaseg.data.zval).
            cases += split_case_along_z(pool, case, tmp, val_fraction=float(val_fraction), gap=gap)
        counts = {s: sum(c["n_slices"] for c in cases if c["split"] == s) for s in ("train", "val")}
        if not counts["train"] or not counts["val"]:
            raise HepasegError(
                f"{pool}: fold holding out {held_out!r} leaves {counts['train']} training and {counts['val']} "
                f"validation slices: expected at least one of each (the last {val_fraction:g} of each training "
                f"patient's kept slices, {gap} z positions apart, validate). Add patients, or prepare more slices "
                "(--prepare-option slices=liver)"
            )
        fold = {**manifest, "n_slices": int(sum(c["n_slices"] for c in cases)), "cases": cases,
                "crossval": {"held_out": held_out, "val_fraction": float(val_fraction), "gap": gap,
                             "pool": str(pool)}}
        write_json_atomic(tmp / "manifest.json", fold)
    return fold


# --- the protocol -------------------------------------------------------------------------------


def _check_choices(names: Sequence[str], allowed: Sequence[str], what: str) -> None:
    for key in names:
        if key not in allowed:
            raise HepasegError(f"{what}: {key!r} cannot be set: expected one of {', '.join(sorted(allowed))}")


def _command(sources, out, names, seeds, cascade, liver_model, liver_size, size, width, max_minutes_per_run,
             max_epochs, train_options, prepare_options, threshold, val_fraction) -> str:
    """The ``hepaseg crossval`` command line equivalent to these arguments."""
    parts = ["hepaseg", "crossval", *map(str, sources), "--out", str(out), "--models", ",".join(names),
             "--seeds", str(seeds)]
    if cascade:
        parts += ["--cascade", "--liver-model", liver_model, "--liver-size", str(liver_size)]
    parts += ["--size", str(size), "--width", str(width), "--max-epochs", str(max_epochs)]
    if max_minutes_per_run is not None:
        parts += ["--max-minutes-per-run", f"{max_minutes_per_run:g}"]
    if threshold != 0.5:
        parts += ["--threshold", f"{threshold:g}"]
    if val_fraction != 0.15:
        parts += ["--val-fraction", f"{val_fraction:g}"]
    flags = {"synthetic_tumors": "--synthetic-tumors", "augment": "--augment", "batch_size": "--batch-size"}
    for key, value in train_options.items():
        if key in flags and not isinstance(value, (dict, list, bool)) and value is not None:
            parts += [flags[key], str(value)]
        else:
            parts += ["--train-option", f"{key}={json.dumps(value)}"]
    for key, value in prepare_options.items():
        parts += ["--prepare-option", f"{key}={json.dumps(value)}"]
    return " ".join(shlex.quote(p) for p in parts)


def _prepare_pool(
    sources, dest: Path, options: dict[str, Any], say, dicom: DicomOptions | None = None
) -> dict[str, Any]:
    from rich.console import Console

    from hepaseg.data import is_prepared_dir, prepare, read_manifest

    if is_prepared_dir(dest):
        return read_manifest(dest)
    say(f"preparing {dest.name} data of every patient -> {dest}")
    return prepare(sources, dest, split=(1.0, 0.0, 0.0), progress=False, console=Console(quiet=True), dicom=dicom,
                   **options)


def _train_state(run: Path, marker: str) -> str:
    """:func:`~hepaseg.experiments.compare.train_state` of a crossval run: done once ``marker`` exists."""
    return train_state(run, (run / marker).is_file())


def _train_run(config_kwargs: dict[str, Any], run: Path, state: str):
    from hepaseg.training import TrainConfig, train

    config = TrainConfig(out=str(run), resume=state == "resume", overwrite=state == "restart", progress_bar=False,
                         **config_kwargs)
    result = train(config)
    if result.last_checkpoint is None:
        raise HepasegError(f"{run}: training wrote no last.ckpt: expected one per run. Raise --max-minutes-per-run "
                           "or --max-epochs")
    return result


# --- crossval -----------------------------------------------------------------------------------


def crossval(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    models: str | Sequence[str] = ("unet",),
    seeds: int = 2,
    cascade: bool = False,
    liver_model: str = "unet",
    liver_size: int = 128,
    size: int = 224,
    width: int = 16,
    max_minutes_per_run: float | None = None,
    max_epochs: int = 50,
    train_options: Mapping[str, Any] | None = None,
    prepare_options: Mapping[str, Any] | None = None,
    threshold: float = 0.5,
    val_fraction: float = 0.15,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
    dicom: DicomOptions | None = None,
) -> CrossvalResult:
    """Leave-one-patient-out training and whole-volume scoring of ``models`` x ``seeds`` (module docstring).

    Args:
        sources: CT files or folders holding at least two labelled patients (every case found
            is one patient and one fold).
        out: crossval directory (created; rerun with the same arguments to resume).
        models: tumour networks, ``"unet,mfcnet"`` or a list (default ``("unet",)``).
        seeds: seeds per model and fold, >= 1 (default 2); seeds ``0 .. seeds - 1``.
        cascade: liver-first cascade: a liver stage (``liver_model`` at ``liver_size`` px, on
            ``prepare(target="liver")`` data) and a tumour stage on liver-cropped slices
            (``prepare(roi="liver")``); predicted with :func:`~hepaseg.inference.cascade.predict_cascade`.
        liver_model, liver_size: the liver stage's network and slice size (cascade only).
        size: tumour-stage slice size in pixels (default 224).
        width: ``base_width`` of every network (default 16).
        max_minutes_per_run: wall-clock training budget of each run (default None: epochs only).
        max_epochs: epoch budget of each run (default 50).
        train_options: further :class:`hepaseg.training.TrainConfig` fields of the tumour stage,
            shared by every run, e.g. ``{"synthetic_tumors": 0.5, "augment": "nnunet"}``, ``loss``,
            ``batch_size``, ``precision`` (``None`` is resolved once from the hardware).
        prepare_options: further :func:`hepaseg.data.prepare` arguments of the tumour stage
            (``window``, ``slices``, ``context_slices``, ``roi_margin_mm``); the liver stage
            shares ``window`` and ``context_slices``.
        threshold: tumour probability threshold in (0, 1) (default 0.5).
        val_fraction: share of each training patient's kept slices monitored as validation (default 0.15).
        device: prediction device (default CUDA when available, else CPU); fp32.
        log: called with one line per step (e.g. ``console.print``); default silent.
        dicom: series choice and SEG segment names for DICOM study cases (``--series``,
            ``--seg-labels``); their SEG objects are found in each study folder.

    Returns:
        A :class:`CrossvalResult`; the same numbers are in ``OUT/crossval.csv``, ``lesions.csv``
        and ``table.md``.

    Runs one after another in this process; :func:`crossval_plan`, :func:`crossval_run` and
    :func:`crossval_collect` split the same work over cluster array tasks or local workers (each
    run is claimed, so this call may share ``out`` with them: it waits for the runs they hold).

    Raises:
        HepasegError: fewer than two patients, an unlabelled patient, unknown model, bad
            option, a protocol that differs from the one already in ``out``, or any
            prepare/training/prediction error.
    """
    t_start = time.perf_counter()
    setup = _cv_setup(sources, out, models=models, seeds=seeds, cascade=cascade, liver_model=liver_model,
                      liver_size=liver_size, size=size, width=width, max_minutes_per_run=max_minutes_per_run,
                      max_epochs=max_epochs, train_options=train_options, prepare_options=prepare_options,
                      threshold=threshold, val_fraction=val_fraction, device=device, log=log, dicom=dicom)
    trained: list[tuple[str, str, int]] = []
    tumor_runs = [e for e in setup.runs if e["stage"] == "tumor"]
    for step, entry in enumerate(tumor_runs, start=1):
        where = f"[{step}/{len(tumor_runs)}] fold {entry['fold']}, {entry['model']}, seed {entry['seed']}"
        outcome = run_claimed(setup.out / CLAIMS_DIR, entry["id"], lambda e=entry: setup.is_done(e),
                              lambda claim, e=entry, w=where: _run_entry(setup, e, claim, w, trained),
                              wait=True, log=setup.say)
        if outcome == "done":
            setup.say(f"{where}: done already, skipped")
    return _cv_collect(setup, trained, t_start)


@dataclass
class _CvSetup:
    """Everything the runs of one crossval share, checked once (``protocol.json`` pinned, data prepared)."""

    out: Path
    names: list[str]
    seeds: int
    folds: list[str]
    cascade: bool
    liver_model: str
    liver_size: int
    width: int
    max_epochs: int
    max_minutes_per_run: float | None
    shared: dict[str, Any]
    liver_shared: dict[str, Any]
    threshold: float
    val_fraction: float
    device: str | None
    protocol: dict[str, Any]
    command: str
    source_of: dict[str, str]
    say: Callable[[str], None]
    dicom: DicomOptions | None = None
    _volume: tuple[str, Any] | None = None  # (fold, volume): the last held-out volume read

    @property
    def runs(self) -> list[dict[str, Any]]:
        """The plan: per fold and seed, the liver stage (cascade) and then each tumour model."""
        entries: list[dict[str, Any]] = []
        for fold in self.folds:
            for seed in range(self.seeds):
                if self.cascade:
                    entries.append({"id": f"{fold}/liver-{self.liver_model}/seed{seed}", "stage": "liver",
                                    "model": f"liver-{self.liver_model}", "fold": fold, "seed": seed})
                entries += [{"id": f"{fold}/{name}/seed{seed}", "stage": "tumor", "model": name, "fold": fold,
                             "seed": seed} for name in self.names]
        return [{"index": i, **e} for i, e in enumerate(entries)]

    def fold_dir(self, fold: str) -> Path:
        return self.out / "folds" / _safe_name(fold)

    def run_dir(self, entry: Mapping[str, Any]) -> Path:
        return self.fold_dir(entry["fold"]) / entry["model"] / f"seed{entry['seed']}"

    def is_done(self, entry: Mapping[str, Any]) -> bool:
        marker = _STAGE_MARKER if entry["stage"] == "liver" else _MARKER
        return _train_state(self.run_dir(entry), marker) == "done"

    def held_out(self, fold: str):
        if self._volume is None or self._volume[0] != fold:
            self._volume = (fold, _read_held_out(self.source_of[fold], fold, self.dicom))
        return self._volume[1]


def _cv_setup(sources, out, *, models, seeds, cascade, liver_model, liver_size, size, width, max_minutes_per_run,
              max_epochs, train_options, prepare_options, threshold, val_fraction, device, log,
              dicom=None) -> _CvSetup:
    from hepaseg.data import prepare
    from hepaseg.training import TrainConfig
    from hepaseg.training.train import resolve_config

    say = log or (lambda _msg: None)
    names = parse_models(models)
    if cascade:
        parse_models([liver_model])
    for option, value in (("--seeds", seeds), ("--size", size), ("--liver-size", liver_size), ("--width", width),
                          ("--max-epochs", max_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HepasegError(f"{option}: invalid value: expected a positive integer, got {value!r}")
    threshold = check_threshold(threshold)
    if not 0.0 < float(val_fraction) <= 0.5:
        raise HepasegError(f"--val-fraction: expected a fraction in (0, 0.5], got {val_fraction!r}")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [Path(s) for s in sources]
    out = Path(out)
    # Before any work: a new folder, or this command's earlier (resumable) output; never around a source.
    out_state = check_output_dir(out, command="crossval", inputs=sources, reuse=True)
    train_opts = dict(train_options or {})
    prep_opts = dict(prepare_options or {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    _check_choices(train_opts, sorted(fields - set(_OWN_FIELDS)), "train_options (--train-option)")
    prepare_args = set(inspect.signature(prepare).parameters) - set(_OWN_PREPARE)
    _check_choices(prep_opts, sorted(prepare_args), "prepare_options (--prepare-option)")

    # Resolve hardware defaults (precision) ONCE so every run shares them.
    probe = resolve_config(TrainConfig(data=str(out), model=names[0], out=str(out), width=width,
                                       max_epochs=max_epochs, max_minutes=max_minutes_per_run, **train_opts))
    shared = {k: v for k, v in probe.to_dict().items() if k not in _OWN_FIELDS}
    liver_shared = {k: shared[k] for k in _LIVER_SHARED if k in shared}
    tumor_prepare = {**prep_opts, "size": size, **({"roi": "liver"} if cascade else {})}
    liver_prepare = {k: prep_opts[k] for k in ("window", "context_slices") if k in prep_opts}
    liver_prepare.update(size=liver_size, target="liver")
    command = _command(sources, out, names, seeds, cascade, liver_model, liver_size, size, width,
                       max_minutes_per_run, max_epochs, train_opts, prep_opts, float(threshold), float(val_fraction))
    protocol = json_safe({
        "sources": [str(s.resolve()) for s in sources], "cascade": bool(cascade),
        "liver_model": liver_model if cascade else None, "liver_size": liver_size if cascade else None,
        "width": width, "max_epochs": max_epochs, "max_minutes_per_run": max_minutes_per_run,
        "threshold": float(threshold), "val_fraction": float(val_fraction), "prepare": tumor_prepare,
        "liver_prepare": liver_prepare if cascade else None, "train": shared,
        "liver_train": liver_shared if cascade else None, "evaluated_checkpoint": "last.ckpt",
        **({} if dicom is None else {"dicom": {"series": dicom.series, "seg_labels": dicom.seg_labels}}),
    })
    for src in sources:
        if not src.exists():
            raise HepasegError(f"{src}: source not found: expected an existing file or folder of CT volumes")
    n_cases = len(find_cases(sources))  # cheap (paths only): refuse one patient before writing anything
    if n_cases < 2:
        raise HepasegError(f"{', '.join(map(str, sources))}: {n_cases} patient found: expected at least two "
                           "labelled patients for leave-one-patient-out. Add sources")
    out.mkdir(parents=True, exist_ok=True)
    if out_state == "new":
        write_output_marker(out, "crossval")
    _check_protocol(out, protocol)

    pool = _prepare_pool(sources, out / "prepared" / "tumor", tumor_prepare, say, dicom)
    folds = sorted(c["id"] for c in pool["cases"])
    if len(folds) < 2:
        raise HepasegError(f"{', '.join(map(str, sources))}: {len(folds)} patient found: expected at least two "
                           "labelled patients for leave-one-patient-out. Add sources")
    unlabelled = [c["id"] for c in pool["cases"] if not c.get("has_label", True)]
    if unlabelled:
        raise HepasegError(f"{', '.join(unlabelled)}: no label map: expected every crossval patient to be labelled "
                           "(it is scored when held out). Remove unlabelled sources")
    if cascade:
        liver_pool = _prepare_pool(sources, out / "prepared" / "liver", liver_prepare, say, dicom)
        liver_ids = sorted(c["id"] for c in liver_pool["cases"])
        if liver_ids != folds:  # pragma: no cover - the same sources give the same cases
            raise HepasegError(f"{out / 'prepared'}: liver and tumour data hold different patients ({liver_ids} vs "
                               f"{folds}): expected the same. Use a new --out")
    source_of = {c["id"]: c["source"] for c in pool["cases"]}

    return _CvSetup(out=out, names=names, seeds=seeds, folds=folds, cascade=bool(cascade), liver_model=liver_model,
                    liver_size=liver_size, width=width, max_epochs=max_epochs,
                    max_minutes_per_run=max_minutes_per_run, shared=shared, liver_shared=liver_shared,
                    threshold=float(threshold), val_fraction=float(val_fraction), device=device, protocol=protocol,
                    command=command, source_of=source_of, say=say, dicom=dicom)


def _run_entry(setup: _CvSetup, entry: Mapping[str, Any], claim: Claim, where: str,
               trained: list[tuple[str, str, int]]) -> None:
    """Train one plan entry (liver stage, or tumour model + scoring of the held-out patient)."""
    from hepaseg.training import load_checkpoint

    fold, seed = entry["fold"], entry["seed"]
    fold_dir = setup.fold_dir(fold)
    liver_run = fold_dir / f"liver-{setup.liver_model}" / f"seed{seed}"
    if entry["stage"] == "liver":
        _liver_stage(setup.out, fold, fold_dir, liver_run, setup.liver_model, seed, setup.width, setup.max_epochs,
                     setup.max_minutes_per_run, setup.liver_shared, setup.val_fraction, trained, setup.say, claim)
        return
    name, run = entry["model"], setup.run_dir(entry)
    state = _train_state(run, _MARKER)
    data = _fold_data(setup.out / "prepared" / "tumor", fold_dir / "data-tumor", fold, setup.val_fraction)
    if setup.cascade:
        # The fold and seed's liver stage, shared by every tumour model: run here unless another
        # worker holds it (then wait for it).
        liver_entry = next(e for e in setup.runs if e["stage"] == "liver" and e["fold"] == fold
                           and e["seed"] == seed)
        run_claimed(setup.out / CLAIMS_DIR, liver_entry["id"], lambda: setup.is_done(liver_entry),
                    lambda liver_claim: _liver_stage(setup.out, fold, fold_dir, liver_run, setup.liver_model, seed,
                                                     setup.width, setup.max_epochs, setup.max_minutes_per_run,
                                                     setup.liver_shared, setup.val_fraction, trained, setup.say,
                                                     liver_claim),
                    wait=True, log=setup.say)
    setup.say(f"{where}: {'resuming' if state == 'resume' else 'training'}")
    result = _train_run(dict(data=str(data), model=name, seed=seed, width=setup.width, target="tumor",
                             max_epochs=setup.max_epochs, max_minutes=setup.max_minutes_per_run, **setup.shared),
                        run, state)
    trained.append((name, fold, seed))
    volume = setup.held_out(fold)
    setup.say(f"{where}: predicting the held-out volume with last.ckpt")
    t0 = time.perf_counter()
    loaded = load_checkpoint(result.last_checkpoint)
    liver_pred, warnings = None, []
    if setup.cascade:
        from hepaseg.inference.cascade import predict_cascade

        liver_loaded = load_checkpoint(liver_run / "last.ckpt")
        res = predict_cascade(liver_loaded.model, liver_loaded.data_options, loaded.model, loaded.data_options,
                              volume, threshold=setup.threshold, device=setup.device, precision="fp32",
                              progress=False)
        pred, liver_pred, warnings = res.tumor, res.liver, list(res.warnings)
    else:
        from hepaseg.inference.predictor import predict_volume

        pred = predict_volume(loaded.model, volume, loaded.data_options, threshold=setup.threshold,
                              device=setup.device, precision="fp32", progress=False)
    predict_s = time.perf_counter() - t0
    metrics, lesion_rows = case_metrics(pred, volume.label, volume.spacing, liver_pred=liver_pred)
    fold_manifest = json.loads((data / "manifest.json").read_text())
    info = result.to_dict()
    row = {
        "model": name, "fold": fold, "seed": seed, **metrics, "warnings": "; ".join(warnings),
        "train_slices": sum(c["n_slices"] for c in fold_manifest["cases"] if c["split"] == "train"),
        "val_slices": sum(c["n_slices"] for c in fold_manifest["cases"] if c["split"] == "val"),
        "epochs": info.get("epochs"), "stopped_by_time": info.get("stopped_by_time"),
        "train_wall_s": info.get("wall_seconds"), "predict_s": predict_s,
        "checkpoint": str(result.last_checkpoint),
    }
    _publish(claim, run / _MARKER, {"row": row, "lesions": lesion_rows, "train": info,
                                    "worker": f"{socket.gethostname()}:{os.getpid()}"})


def _publish(claim: Claim, path: Path, payload: dict[str, Any]) -> None:
    """Write a run's marker, only while this worker still holds the run's claim."""
    if not claim.still_owned():
        raise HepasegError(f"{path.parent}: another worker took this run over while it ran (its claim went stale): "
                           "expected to hold it to the end. Its result is left to that worker")
    write_json_atomic(path, json_safe(payload))


def _cv_collect(setup: _CvSetup, trained: list[tuple[str, str, int]], t_start: float) -> CrossvalResult:
    """crossval.csv, lesions.csv and table.md from the finished runs; ``missing`` names the others."""
    rows: list[dict[str, Any]] = []
    lesions: list[dict[str, Any]] = []
    missing: list[str] = []
    for entry in setup.runs:
        if entry["stage"] != "tumor":
            continue
        if not setup.is_done(entry):
            missing.append(entry["id"])
            continue
        marker = json.loads((setup.run_dir(entry) / _MARKER).read_text())
        rows.append(_from_json(marker["row"]))
        lesions += [{"model": entry["model"], "fold": entry["fold"], "seed": entry["seed"], **r}
                    for r in marker["lesions"]]
    if missing:
        setup.say(f"missing (not finished): {', '.join(missing)}")
    names = [n for n in setup.names if any(r["model"] == n for r in rows)]
    if not names:
        raise HepasegError(f"{setup.out}: no finished run to collect: expected at least one of the planned tumour "
                           "runs done. Run the workers (--run-index) first")
    seeds, out = setup.seeds, setup.out
    dice_global = {
        name: [_pooled_dice([r for r in rows if r["model"] == name and r["seed"] == s]) for s in range(seeds)]
        for name in names
    }
    paths = {
        "csv": write_csv_atomic(out / "crossval.csv", rows, CROSSVAL_CSV_COLUMNS),
        "lesions": write_csv_atomic(out / "lesions.csv", lesions, LESION_CSV_COLUMNS),
    }
    if not missing:  # an ensemble list of part of the folds would pass for the whole
        paths.update(_write_ensembles(out, names, setup.folds, seeds, rows,
                                      setup.liver_model if setup.cascade else None))
    wall = time.perf_counter() - t_start
    table = _table_markdown(names, setup.folds, seeds, rows, lesions, dice_global, setup.protocol, setup.command,
                            setup.cascade, setup.liver_model, setup.liver_size, trained, wall)
    if missing:
        table += (f"\n**Incomplete: {len(missing)} planned run(s) not finished, left out of every number above: "
                  f"{', '.join(missing)}.**\n")
    paths["table"] = write_text_atomic(out / "table.md", table)
    return CrossvalResult(out=out, models=names, seeds=list(range(seeds)), folds=setup.folds, rows=rows,
                          lesions=lesions, dice_global=dice_global, trained=trained, table=table,
                          protocol=setup.protocol, command=setup.command, wall_seconds=wall, paths=paths,
                          missing=missing)


def crossval_plan(sources, out, **options) -> list[dict[str, Any]]:
    """Prepare every patient and every fold's data once, pin the protocol and write ``OUT/plan.json``.

    Keyword options as :func:`crossval`. Returns the runs (``index``, ``id``, ``stage`` ``liver``
    or ``tumor``, ``model``, ``fold``, ``seed``); index ``i`` is array task ``i``. The data is made
    here, once, so that the array tasks only read it.
    """
    setup = _cv_setup(sources, out, **_cv_options(options))
    for fold in setup.folds:
        _fold_data(setup.out / "prepared" / "tumor", setup.fold_dir(fold) / "data-tumor", fold, setup.val_fraction)
        if setup.cascade:
            _fold_data(setup.out / "prepared" / "liver", setup.fold_dir(fold) / "data-liver", fold,
                       setup.val_fraction)
    write_json_atomic(setup.out / PLAN_FILE, {"kind": "crossval", "runs": setup.runs, "protocol": setup.protocol,
                                              "command": setup.command})
    return setup.runs


def crossval_run(sources, out, *, run_index: int | None = None, **options) -> dict[str, list]:
    """Run plan entry ``run_index`` of ``OUT/plan.json`` (one array task), or with ``run_index=None``
    every entry no live worker holds (a local worker); each run claimed (see
    :func:`hepaseg.experiments.compare.compare_run`). Keyword options as :func:`crossval`, matching
    ``--plan``'s. Returns ``{"ran": [ids], "done": [ids], "held": [ids]}``."""
    if not (Path(out) / PLAN_FILE).is_file():  # before _cv_setup, which would prepare the data itself
        read_plan(out, "crossval", [])
    setup = _cv_setup(sources, out, **_cv_options(options))
    runs = read_plan(setup.out, "crossval", setup.runs)
    trained: list[tuple[str, str, int]] = []
    return run_plan(runs, setup.out / CLAIMS_DIR, run_index, setup.is_done,
                    lambda e, claim, where: _run_entry(setup, e, claim, where, trained), setup.say)


def crossval_collect(sources, out, **options) -> CrossvalResult:
    """crossval.csv, lesions.csv and table.md from the runs finished so far (``missing``: the others).

    Keyword options as :func:`crossval`. Trains nothing."""
    t_start = time.perf_counter()
    setup = _cv_setup(sources, out, **_cv_options(options))
    return _cv_collect(setup, [], t_start)


def _cv_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`crossval`'s keyword defaults, updated with ``options`` (unknown names refused)."""
    params = inspect.signature(crossval).parameters
    defaults = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"unexpected crossval option(s): {', '.join(unknown)}")
    return {**defaults, **options}


def _write_ensembles(out: Path, names, folds, seeds: int, rows, liver_model: str | None) -> dict[str, Path]:
    """``OUT/ensembles/<model>.json``: every fold x seed of a model (and its liver stages) as one ensemble."""
    from hepaseg.evaluation.ensemble import write_ensemble_list

    liver = ([out / "folds" / _safe_name(f) / f"liver-{liver_model}" / f"seed{k}" / "last.ckpt"
              for f in folds for k in range(seeds)] if liver_model else [])
    paths = {}
    for name in names:
        members = [r["checkpoint"] for r in rows if r["model"] == name]
        paths[f"ensemble_{name}"] = write_ensemble_list(
            out / "ensembles" / f"{name}.json", members, liver_checkpoints=liver, model=name, source="crossval",
            note=(f"{len(folds)} folds x {seeds} seed(s) of {name} (last.ckpt), each trained without its held-out "
                  "patient: an ensemble for NEW patients (scoring it on a crossval patient would leak)"))
    return paths


def _fold_data(pool: Path, dest: Path, fold: str, val_fraction: float) -> Path:
    from hepaseg.data import is_prepared_dir

    if not is_prepared_dir(dest):
        make_fold_data(pool, dest, fold, val_fraction=val_fraction)
    return dest


def _liver_stage(out, fold, fold_dir, run, liver_model, seed, width, max_epochs, max_minutes, liver_shared,
                 val_fraction, trained, say, claim: Claim) -> None:
    state = _train_state(run, _STAGE_MARKER)
    if state == "done":
        return
    data = _fold_data(out / "prepared" / "liver", fold_dir / "data-liver", fold, val_fraction)
    say(f"fold {fold}, liver stage {liver_model}, seed {seed}: {'resuming' if state == 'resume' else 'training'}")
    result = _train_run(dict(data=str(data), model=liver_model, seed=seed, width=width, max_epochs=max_epochs,
                             max_minutes=max_minutes, target="liver", **liver_shared), run, state)
    trained.append((f"liver-{liver_model}", fold, seed))
    _publish(claim, run / _STAGE_MARKER, {"train": result.to_dict(), "worker": f"{socket.gethostname()}:{os.getpid()}"})


def _read_held_out(source: str, fold: str, dicom: DicomOptions | None = None):
    from hepaseg.io import read_volume

    volume = read_volume(source, with_label=True, dicom=dicom)
    if volume.label is None:
        raise HepasegError(f"{source}: held-out patient {fold!r} has no label map: expected a labelled case")
    return volume


def _from_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A marker row back in memory: JSON null -> NaN, "inf" -> inf (json_safe's inverse)."""
    out = {}
    for key, value in row.items():
        if value is None and key not in ("warnings", "checkpoint"):
            value = math.nan
        elif value in ("inf", "-inf"):
            value = float(value)
        out[key] = value
    return out


def _pooled_dice(rows: Sequence[Mapping[str, Any]]) -> float:
    inter = sum(int(r["intersection"]) for r in rows)
    denom = sum(int(r["pred_voxels"]) + int(r["target_voxels"]) for r in rows)
    return 1.0 if denom == 0 else 2 * inter / denom


# --- table.md -----------------------------------------------------------------------------------


def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample sd (ddof 1; NaN with one value) over the finite values, and their count."""
    arr = np.asarray([v for v in values if isinstance(v, (int, float)) and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan, int(arr.size)


def _fmt(mean: float, sd: float, kind: str) -> str:
    if math.isnan(mean):
        return "–"
    scale = 100.0 if kind == "pct" else 1.0
    text = f"{scale * mean:.2f}"
    return text if math.isnan(sd) else f"{text} ± {scale * sd:.2f}"


def _table_markdown(names, folds, seeds, rows, lesions, dice_global, protocol, command, cascade, liver_model,
                    liver_size, trained, wall) -> str:
    lines = [
        *_intro_lines(folds, seeds, protocol, cascade, liver_model, liver_size),
        *_means_table_lines(names, rows, dice_global, cascade),
        *_detection_lines(names, rows, lesions),
        *_per_fold_lines(names, folds, rows),
        *_noise_lines(names, folds, seeds, rows),
        *_protocol_lines(protocol, command, cascade, liver_model, liver_size, trained, wall),
    ]
    return "\n".join(lines) + "\n"


def _intro_lines(folds, seeds, protocol, cascade, liver_model, liver_size) -> list[str]:
    """Title, variant and tumour-stage recipe, and what a cell of the tables means."""
    n_runs = len(folds) * seeds
    variant = (f"cascade (liver stage {liver_model} at {liver_size} px, tumour stage on liver-cropped slices)"
               if cascade else "whole slices (single network)")
    train = protocol["train"]
    recipe = {k: train.get(k) for k in ("loss", "augment", "synthetic_tumors", "synthetic_families",
                                         "liver_enhancement", "aug_off", "crop", "tumor_crop_fraction", "batch_size",
                                         "lr", "precision") if k in train}
    return [
        "# hepaseg crossval — leave one patient out",
        "",
        f"Variant: {variant}. Tumour-stage training: " + ", ".join(f"{k} {v}" for k, v in recipe.items()) + ".",
        "",
        (f"{len(folds)} patients = {len(folds)} folds ({', '.join(folds)}), {seeds} seed(s): each cell is the mean ± "
         f"sd (ddof 1) over the {n_runs} (fold, seed) runs of a model, each scored on the held-out patient's whole "
         "volume at its own resolution. Recalls average only the runs whose patient has a lesion (in that bin); "
         "Dice global pools voxels over the held-out patients per seed, then mean ± sd over seeds."),
        "",
    ]


def _means_table_lines(names, rows, dice_global, cascade) -> list[str]:
    """One row per model: Dice global and the mean ± sd of each :data:`_TABLE_METRICS` over its runs."""
    metric_cols = [h for _, h, _ in _TABLE_METRICS]
    extra = ["liver Dice (%)"] if cascade else []
    header = ["model", "Dice global (%)", *metric_cols, *extra]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        mean, sd, _ = _mean_sd(dice_global[name])
        cells = [name, _fmt(mean, sd, "pct")]
        for key, _, kind in _TABLE_METRICS + ((("liver_dice", "", "pct"),) if cascade else ()):
            m, s, _ = _mean_sd([r[key] for r in mine])
            cells.append(_fmt(m, s, kind))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _detection_lines(names, rows, lesions) -> list[str]:
    """Detection recall per model and diameter bin, pooled over lesions and per run."""
    lines = ["", "## Detection recall by largest axial diameter", "",
             ("Pooled: found / reference lesions over every fold and seed (a lesion counts once per seed). "
              "Per run: mean ± sd of the per-run recall over the runs whose patient has a lesion in the bin."), "",
             "| model | diameter | lesions | found IoU>0.5 | found any | recall IoU>0.5 pooled (%) | "
             "recall any pooled (%) | recall IoU>0.5 per run (%) | recall any per run (%) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        for bin_name, lo, hi in DIAMETER_BINS:
            mine = [les for les in lesions if les["model"] == name and les["bin"] == bin_name]
            n = len(mine)
            f_iou = sum(bool(les["found_iou"]) for les in mine)
            f_any = sum(bool(les["found_any"]) for les in mine)
            key = _BIN_KEYS[bin_name]
            runs = [r for r in rows if r["model"] == name]
            per_iou = _mean_sd([r[f"recall_iou_{key}"] for r in runs])
            per_any = _mean_sd([r[f"recall_any_{key}"] for r in runs])
            label = f"< {hi:g} mm" if lo == 0 else (f"> {lo:g} mm" if math.isinf(hi) else f"{lo:g}-{hi:g} mm")
            lines.append(
                f"| {name} | {label} | {n} | {f_iou} | {f_any} | "
                f"{_fmt(f_iou / n if n else math.nan, math.nan, 'pct')} | "
                f"{_fmt(f_any / n if n else math.nan, math.nan, 'pct')} | "
                f"{_fmt(per_iou[0], per_iou[1], 'pct')} | {_fmt(per_any[0], per_any[1], 'pct')} |")
    return lines


def _per_fold_lines(names, folds, rows) -> list[str]:
    """One row per (model, held-out patient): mean ± sd over its seeds."""
    lines = ["", "## Per fold (held-out patient; mean ± sd over seeds)", "",
             "| model | held out | Dice 3D (%) | recall any overlap (%) | FP lesions / volume | "
             "FP rate, tumour-free liver slices (%) | epochs |", "|---|---|---:|---:|---:|---:|---|"]
    for name in names:
        for fold in folds:
            mine = [r for r in rows if r["model"] == name and r["fold"] == fold]
            cells = [_fmt(*_mean_sd([r[k] for r in mine])[:2], kind)
                     for k, kind in (("dice", "pct"), ("recall_any", "pct"), ("fp_lesions", "num"),
                                     ("fp_slice_rate", "pct"))]
            epochs = "/".join(str(r.get("epochs")) for r in mine)
            lines.append(f"| {name} | {fold} | " + " | ".join(cells) + f" | {epochs} |")
    return lines


def _noise_lines(names, folds, seeds, rows) -> list[str]:
    """How noisy the numbers are: Dice spread between folds and between seeds, per model."""
    n_runs = len(folds) * seeds
    noise = []
    for name in names:
        fold_means = [_mean_sd([r["dice"] for r in rows if r["model"] == name and r["fold"] == f])[0] for f in folds]
        seed_sds = [_mean_sd([r["dice"] for r in rows if r["model"] == name and r["fold"] == f])[1] for f in folds]
        f_sd = _mean_sd(fold_means)[1]
        s_sd = _mean_sd(seed_sds)[0]
        noise.append(f"{name}: sd of Dice between folds {_fmt(f_sd, math.nan, 'pct')} pp, "
                     f"mean sd between seeds within a fold {_fmt(s_sd, math.nan, 'pct')} pp")
    return [
        "", "## How noisy this is", "",
        (f"Each fold's test set is ONE patient, so with {len(folds)} patients the fold-to-fold spread mixes "
         "model variance with how hard each patient is, and the sd above rests on "
         f"{n_runs} runs of only {len(folds)} independent patients (seeds are not independent test data). "
         "Treat a difference between two variants as a hint, not a finding, unless it exceeds these spreads "
         "and has the same sign in every fold (see the per-fold table); detection recall in a diameter bin "
         "may rest on one or two lesions."),
        "",
        *[f"- {line}" for line in noise],
    ]


def _protocol_lines(protocol, command, cascade, liver_model, liver_size, trained, wall) -> list[str]:
    """The protocol section: command, folds, validation, both stages' settings, scoring, this call's work."""
    budget = f"{protocol['max_epochs']} epoch{'s' if protocol['max_epochs'] != 1 else ''} max"
    if protocol["max_minutes_per_run"]:
        budget += f", {protocol['max_minutes_per_run']:g} min wall-clock max per run"
    prep = protocol["prepare"]
    return [
        "",
        "## Protocol",
        "",
        f"- command: `{command}`",
        ("- folds: leave one patient out; the held-out patient is never in its fold's training directory "
         "(`folds/<patient>/data-*/manifest.json`)"),
        (f"- validation: the last {protocol['val_fraction']:g} of each training patient's kept slices (a "
         "contiguous z block, 2K + 2 z positions from the training block), monitored only; the held-out "
         "patient is scored with `last.ckpt` (no checkpoint selection)"),
        (f"- tumour stage: width {protocol['width']}, {budget}, prepare " + ", ".join(f"{k} {v}" for k, v in
                                                                                     prep.items())),
        *([f"- liver stage: {liver_model}, width {protocol['width']}, {liver_size} px, whole slices with and "
           "without liver, default training options (throughput/hardware options shared), one per fold and "
           "seed, last.ckpt"] if cascade else []),
        (f"- scoring: threshold {protocol['threshold']:g} on probabilities resized to the scan's resolution, fp32; "
         "lesions are 26-connected components; found = IoU > 0.5 with one predicted lesion, or any overlap; "
         "diameter = largest axial Feret diameter (as `hepaseg predict`'s lesion table); FP lesion = predicted "
         "lesion touching no reference lesion; FP slice rate = share of reference slices with liver and no "
         "tumour where any tumour is predicted"),
        f"- this call: trained or resumed {len(trained)} run(s), {wall / 60:.1f} min wall",
    ]
