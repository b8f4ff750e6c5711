"""Re-score a finished crossval: single runs vs seed ensembles, TTA, post-processing settings.

``hepaseg crossval ... --postprocess SETTING [--ensemble-seeds] [--score-tta]`` calls
:func:`score_crossval` after the crossval itself (which only trains what is missing), so the
post-processing defaults can be chosen by measurement, without retraining, as nnU-Net decides
its post-processing on its folds. For every held-out patient (fold) and tumour model:

* **variants**: each seed's run alone (``seed<k>``: its ``last.ckpt``, and with the cascade its
  own seed's liver stage: exactly what ``crossval.csv`` scored) and, with ``ensemble=True`` and
  two seeds or more, the ensemble of the fold's seeds (``ensemble``: tumour probabilities
  averaged over the seeds' tumour stages, the liver stage the average of the seeds' liver
  stages; :mod:`hepaseg.inference.ensemble`); each with or without flip TTA (``tta``);
* every variant's held-out volume is predicted ONCE and its raw tumour mask (and predicted
  liver) cached in ``OUT/scoring/<fold>/<model>/<variant>[-tta].npz`` (recomputed when a
  checkpoint changed), then each post-processing setting (:class:`~hepaseg.inference.postprocess.
  PostProcess`, always including ``none``) is applied to that mask and scored with
  :func:`hepaseg.experiments.crossval.case_metrics`: 3D Dice, lesion recall by diameter bin,
  false-positive lesions per volume.

Outputs: ``OUT/postprocess.csv`` (one row per fold x model x variant x TTA x setting) and
``OUT/postprocess.md`` (per model: single runs (mean over seeds) and the ensemble, per setting:
Dice per fold, FP lesions per volume per fold, pooled lesion recall by size).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hepaseg.errors import HepasegError
from hepaseg.evaluation.detection import DIAMETER_BINS
from hepaseg.experiments.crossval import _BIN_KEYS, _MARKER, _safe_name, case_metrics
from hepaseg.inference.postprocess import PostProcess, postprocess_mask
from hepaseg.io.atomic import atomic_path, write_csv_atomic, write_text_atomic

__all__ = ["SCORING_CSV_COLUMNS", "ScoringResult", "parse_settings", "score_crossval"]

#: Columns of ``postprocess.csv`` (fractions in [0, 1], distances in mm, counts in lesions/voxels).
SCORING_CSV_COLUMNS: tuple[str, ...] = (
    "model", "fold", "variant", "members", "tta", "postprocess", "dice", "jaccard", "assd", "hd95",
    "n_target_lesions", "n_pred_lesions", "fp_lesions", "recall_iou", "recall_any",
    *(f"{k}_{b}" for b in _BIN_KEYS.values() for k in ("n_lesions", "found_iou", "found_any")),
    "fp_slice_rate", "liver_dice", "filled_voxels", "removed_small", "removed_outside_liver", "predict_s",
)


@dataclass
class ScoringResult:
    """What :func:`score_crossval` measured (the rows of ``postprocess.csv``) and wrote."""

    out: Path
    rows: list[dict[str, Any]]
    settings: list[PostProcess]
    table: str
    predicted: list[tuple[str, str, str]]  # (fold, model, variant) predicted in this call (not cached)
    paths: dict[str, Path] = field(default_factory=dict)


def parse_settings(settings: Sequence[PostProcess | str], *, cascade: bool) -> list[PostProcess]:
    """``none`` first, then each setting once (text parsed by :meth:`PostProcess.parse`).

    Raises:
        HepasegError: a bad setting, or ``min_liver_fraction`` without the cascade's liver.
    """
    parsed = [s if isinstance(s, PostProcess) else PostProcess.parse(s) for s in settings]
    chosen = list(dict.fromkeys([PostProcess(), *parsed]))
    if not cascade and any(s.needs_liver for s in chosen):
        raise HepasegError("--postprocess: min_liver_fraction needs the predicted liver: expected a crossval run "
                           "with --cascade, got one without")
    return chosen


def _stamp(paths: Sequence[Path]) -> list[list]:
    """Each checkpoint's path and modification time: a cached mask is stale when they change."""
    return [[str(p), p.stat().st_mtime_ns] for p in paths]


def _cached(path: Path, stamp: list[list]) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as npz:
        if json.loads(str(npz["stamp"])) != stamp:
            return None
        return {k: npz[k] for k in ("tumor", "liver")}


def _discover(out: Path, folds: Sequence[str]) -> tuple[list[str], int]:
    """Models and seed count with a finished run (crossval.json) in every fold."""
    first = out / "folds" / _safe_name(folds[0])
    models = sorted(d.name for d in first.iterdir() if d.is_dir() and not d.name.startswith(("liver-", "data-"))
                    and (d / "seed0" / _MARKER).is_file()) if first.is_dir() else []
    if not models:
        raise HepasegError(f"{out}: no finished crossval run: expected folds/<patient>/<model>/seed0/{_MARKER}. "
                           "Run `hepaseg crossval` first (the same command resumes)")
    seeds = 0
    while all((out / "folds" / _safe_name(f) / models[0] / f"seed{seeds}" / _MARKER).is_file() for f in folds):
        seeds += 1
    return models, seeds


def score_crossval(
    out: str | os.PathLike,
    settings: Sequence[PostProcess | str] = (),
    *,
    models: Sequence[str] | None = None,
    seeds: int | None = None,
    ensemble: bool = True,
    tta: bool = False,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ScoringResult:
    """Score every fold's held-out patient under ``settings`` for single runs and seed ensembles.

    Args:
        out: a crossval directory (``hepaseg crossval --out``) with finished runs.
        settings: post-processing settings (:class:`PostProcess` or their text, e.g.
            ``"fill_holes,min_lesion_mm3=50"``); ``none`` is always scored first.
        models: tumour models to score (default: every model with finished runs).
        seeds: seeds per fold to use, 0..seeds-1 (default: every finished seed).
        ensemble: also score the ensemble of each fold's seeds (with two seeds or more).
        tta: predict with flip TTA (cached separately).
        device: prediction device (default CUDA when available, else CPU); fp32.
        log: called with one line per step.

    Returns:
        :class:`ScoringResult`; the same numbers are in ``OUT/postprocess.csv`` and ``postprocess.md``.

    Raises:
        HepasegError: ``out`` is not a finished crossval, a run is missing, or a setting is invalid
            (``min_liver_fraction`` needs the cascade).
    """
    from hepaseg.data import read_manifest
    from hepaseg.experiments.crossval import _read_held_out

    t_start = time.perf_counter()
    say = log or (lambda _msg: None)
    out = Path(out)
    protocol = _read_protocol(out)
    cascade, liver_model = bool(protocol.get("cascade")), protocol.get("liver_model")
    threshold = float(protocol.get("threshold", 0.5))
    chosen = parse_settings(settings, cascade=cascade)
    pool = read_manifest(out / "prepared" / "tumor")
    folds = sorted(c["id"] for c in pool["cases"])
    source_of = {c["id"]: c["source"] for c in pool["cases"]}
    found_models, found_seeds = _discover(out, folds)
    models = list(models) if models else found_models
    seeds = int(seeds) if seeds is not None else found_seeds
    if seeds < 1:
        raise HepasegError(f"{out}: no seed finished in every fold: expected folds/<patient>/<model>/seed0/{_MARKER}")

    rows: list[dict[str, Any]] = []
    predicted: list[tuple[str, str, str]] = []
    for fold in folds:
        fold_dir = out / "folds" / _safe_name(fold)
        volume = _read_held_out(source_of[fold], fold)
        for name in models:
            for variant, tumors, livers in _variants(fold_dir, name, seeds, liver_model=liver_model,
                                                     ensemble=ensemble):
                cache = out / "scoring" / _safe_name(fold) / name / f"{variant}{'-tta' if tta else ''}.npz"
                stamp = _stamp(tumors + (livers if cascade else []))
                masks = _cached(cache, stamp)
                predict_s = math.nan
                if masks is None:
                    say(f"fold {fold}, {name}, {variant}{' + TTA' if tta else ''}: predicting the held-out volume")
                    t0 = time.perf_counter()
                    masks = _predict_masks(tumors, livers, volume, cascade=cascade, tta=tta, threshold=threshold,
                                           device=device)
                    predict_s = time.perf_counter() - t0
                    _save_masks(cache, masks, stamp)
                    predicted.append((fold, name, variant))
                head = {"model": name, "fold": fold, "variant": variant, "members": len(tumors), "tta": bool(tta)}
                rows.extend(_setting_rows(head, masks, volume, chosen, cascade=cascade, predict_s=predict_s))
        del volume

    paths = {"csv": write_csv_atomic(out / "postprocess.csv", rows, SCORING_CSV_COLUMNS)}
    table = _table(rows, models, folds, seeds, chosen, tta, cascade, protocol, time.perf_counter() - t_start,
                   len(predicted))
    paths["table"] = write_text_atomic(out / "postprocess.md", table)
    return ScoringResult(out=out, rows=rows, settings=chosen, table=table, predicted=predicted, paths=paths)


def _read_protocol(out: Path) -> dict[str, Any]:
    """``out/protocol.json`` of a crossval directory (one-line error when there is none)."""
    protocol_path = out / "protocol.json"
    if not protocol_path.is_file():
        raise HepasegError(f"{protocol_path}: not found: expected a crossval directory. Run `hepaseg crossval` first")
    return json.loads(protocol_path.read_text())


def _variants(fold_dir: Path, name: str, seeds: int, *, liver_model: str | None,
              ensemble: bool) -> list[tuple[str, list[Path], list[Path]]]:
    """``(variant, tumour checkpoints, liver checkpoints)``: each seed alone, then their ensemble (two seeds or more).

    Raises HepasegError when a seed of ``name`` has no finished run in this fold.
    """
    tumor_ckpts, liver_ckpts = [], []
    for seed in range(seeds):
        run = fold_dir / name / f"seed{seed}"
        if not (run / _MARKER).is_file():
            raise HepasegError(f"{run}: no finished run ({_MARKER}): expected {seeds} seed(s) of {name} in "
                               "every fold. Finish the crossval first (rerun its command)")
        tumor_ckpts.append(run / "last.ckpt")
        liver_ckpts.append(fold_dir / f"liver-{liver_model}" / f"seed{seed}" / "last.ckpt")
    variants = [(f"seed{k}", [tumor_ckpts[k]], [liver_ckpts[k]]) for k in range(seeds)]
    if ensemble and seeds > 1:
        variants.append(("ensemble", tumor_ckpts, liver_ckpts))
    return variants


def _predict_masks(tumors: list[Path], livers: list[Path], volume, *, cascade: bool, tta: bool, threshold: float,
                   device: str | None) -> dict[str, np.ndarray]:
    """``{"tumor": (Z, Y, X), "liver": (Z, Y, X) with the cascade, else (0,)}`` masks of the held-out volume (fp32)."""
    from hepaseg.inference.cascade import predict_cascade
    from hepaseg.inference.ensemble import load_ensemble, predict_ensemble

    members = load_ensemble(tumors)
    if cascade:
        liver = load_ensemble(livers, option="--liver-checkpoint")
        res = predict_cascade(liver.models, liver.data_options, members.models, members.data_options,
                              volume, tta=tta, threshold=threshold, device=device,
                              precision="fp32", progress=False)
        return {"tumor": res.tumor, "liver": res.liver}
    pred = predict_ensemble(members.models, volume, members.data_options, tta=tta,
                            device=device, precision="fp32", progress=False)
    return {"tumor": pred.mask(threshold), "liver": np.zeros((0,), np.uint8)}


def _save_masks(cache: Path, masks: dict[str, np.ndarray], stamp: list[list]) -> None:
    """Cache the predicted masks (uint8) with the checkpoints' stamp, atomically (read back by :func:`_cached`)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, tumor=masks["tumor"].astype(np.uint8),
                            liver=masks["liver"].astype(np.uint8), stamp=json.dumps(stamp))


def _setting_rows(head: dict[str, Any], masks: dict[str, np.ndarray], volume, settings: Sequence[PostProcess], *,
                  cascade: bool, predict_s: float) -> list[dict[str, Any]]:
    """One ``postprocess.csv`` row per setting: ``head`` + the post-processed tumour mask's metrics."""
    rows = []
    liver_pred = masks["liver"] if cascade else None
    for setting in settings:
        mask, info = postprocess_mask(masks["tumor"], volume.spacing, setting, liver=liver_pred)
        metrics, _ = case_metrics(mask, volume.label, volume.spacing, liver_pred=liver_pred)
        rows.append({
            **head,
            "postprocess": setting.describe(), **{k: metrics.get(k) for k in SCORING_CSV_COLUMNS
                                                  if k in metrics},
            "filled_voxels": info["filled_voxels"], "removed_small": info["removed_small"],
            "removed_outside_liver": info["removed_outside_liver"], "predict_s": predict_s,
        })
    return rows


def _mean(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def _num(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}"


def _table(rows, models, folds, seeds, settings, tta, cascade, protocol, wall, n_predicted) -> str:
    bins = [(name, _BIN_KEYS[name]) for name, _, _ in DIAMETER_BINS]
    lines = [
        "# hepaseg crossval — post-processing, single runs and seed ensembles",
        "",
        (f"{len(folds)} held-out patients ({', '.join(folds)}); {'cascade' if cascade else 'whole slices'}; "
         f"threshold {protocol.get('threshold', 0.5):g}; {'flip TTA' if tta else 'no TTA'}. "
         f"'single' = each of the {seeds} seed(s)' last.ckpt alone, mean over seeds; 'ensemble' = the "
         f"{seeds} seeds' probabilities averaged (the liver stage too). Each post-processing setting edits the "
         "same cached prediction (no retraining). Recall by largest axial diameter is pooled: found (any "
         "overlap) / reference lesions over the folds (and seeds for 'single')."),
        "",
    ]
    fold_cols = [f"Dice {f} (%)" for f in folds] + [f"FP lesions {f}" for f in folds]
    header = ["model", "variant", "post-processing", "Dice mean (%)", *fold_cols, "FP lesions / vol",
              *[f"recall {b} mm (%)" for b, _ in bins], "recall IoU>0.5 (%)"]
    lines += ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for name in models:
        for kind in ("single", "ensemble"):
            for setting in settings:
                text = setting.describe()
                mine = [r for r in rows if r["model"] == name and r["postprocess"] == text
                        and ((r["variant"] == "ensemble") == (kind == "ensemble"))]
                if not mine:
                    continue
                per_fold = {f: [r for r in mine if r["fold"] == f] for f in folds}
                cells = [name, kind if kind == "single" else f"ensemble of {mine[0]['members']}", text,
                         _pct(_mean([_mean([r["dice"] for r in per_fold[f]]) for f in folds]))]
                cells += [_pct(_mean([r["dice"] for r in per_fold[f]])) for f in folds]
                cells += [_num(_mean([r["fp_lesions"] for r in per_fold[f]])) for f in folds]
                cells.append(_num(_mean([r["fp_lesions"] for r in mine])))
                for _, key in bins:
                    n = sum(int(r[f"n_lesions_{key}"]) for r in mine)
                    found = sum(int(r[f"found_any_{key}"]) for r in mine)
                    cells.append(f"{_pct(found / n) if n else '–'} ({found}/{n})")
                n_all = sum(int(r["n_target_lesions"]) for r in mine)
                found_iou = sum(int(r[f"found_iou_{key}"]) for r in mine for _, key in bins)
                cells.append(_pct(found_iou / n_all) if n_all else "–")
                lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        ("Post-processing (hepaseg.inference.postprocess): fill holes = 2D hole filling per axial slice; "
         ">= V mm3 = lesions (26-connected) smaller than V mm^3 dropped; >= F % in liver = lesions with less than "
         "F of their voxels in the predicted liver dropped. Dice per fold: mean over the variant's runs. "
         "FP lesion = predicted lesion touching no reference lesion."),
        "",
        (f"This call predicted {n_predicted} variant(s) (the rest came from OUT/scoring/), {wall / 60:.1f} min "
         "wall. With one patient per fold, a difference between settings is a hint unless it has the same sign "
         "in every fold."),
    ]
    return "\n".join(lines) + "\n"
