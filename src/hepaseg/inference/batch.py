"""``hepaseg predict`` on a folder of many cases: the model loaded once, one result folder per case.

:func:`predict_batch` expands the sources with :func:`hepaseg.io.find_cases` (a LiTS
test folder, MSD ``imagesTs``, a folder of patient studies, ...), loads the network(s)
once (:func:`~hepaseg.inference.pipeline.load_models`) and runs
:func:`~hepaseg.inference.pipeline.predict_case` on each case::

    OUT/batch.json          the settings of the run (checkpoint SHA-256s, threshold, format, ...)
    OUT/<case_id>/...       predict_case's files for that case (written atomically)
    OUT/summary.csv         one row per case (SUMMARY_COLUMNS), rewritten after every case

Resumable: a case whose ``OUT/<case_id>/lesions.json`` exists was finished by an earlier run
and is skipped (its row is rebuilt from its files) unless ``overwrite``; rerunning after an
interruption only predicts the rest. A run with other settings (another checkpoint,
threshold, ...) than ``batch.json`` records is refused unless ``overwrite``, so one folder
never mixes results of two models. A case that fails (unreadable, not CT, ...) gets
``status = error`` and its message in the summary, and the batch goes on.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hepaseg import __version__
from hepaseg.errors import HepasegError
from hepaseg.inference.pipeline import OUTPUT_FORMATS, PredictResult, load_models, predict_case
from hepaseg.inference.postprocess import PostProcess, postprocess_mask
from hepaseg.io import (
    DicomOptions,
    case_id_of,
    check_output_dir,
    find_cases,
    write_json_atomic,
    write_output_marker,
    write_text_atomic,
)

__all__ = ["BATCH_MARKER", "SUMMARY_COLUMNS", "BatchResult", "predict_batch"]

BATCH_MARKER = "batch.json"
SUMMARY_COLUMNS = (
    "case",  # output folder name = the case id (a number is appended when two cases share one)
    "status",  # ok | done earlier | error
    "source",
    "series",  # DICOM: "#number description (uid)" of the series used; else empty
    "tumor_volume_ml",
    "lesion_count",
    "largest_diameter_mm",  # largest axial diameter over the lesions, mm
    "liver_volume_ml",  # cascade only
    "dice",  # labelled cases only: tumour Dice vs the label
    "seconds",  # read + inference + write of this case
    "error",
)
# Settings that must match batch.json for a resumed run to add to the same folder.
_SETTING_KEYS = ("checkpoint_sha256", "liver_checkpoint_sha256", "engine", "threshold", "tta", "labels",
                 "output_format", "series", "seg_labels", "save_probabilities", "postprocess")  # fmt: skip
# What a batch.json written before a setting existed meant by it (so such a batch still resumes).
_SETTING_DEFAULTS = {"save_probabilities": False, "postprocess": PostProcess().as_dict()}


@dataclass
class BatchResult:
    """What :func:`predict_batch` did.

    Attributes:
        out_dir, summary_csv: the output folder and its summary.csv.
        rows: summary rows (SUMMARY_COLUMNS), in case order.
        predicted, skipped, failed: case names predicted now, finished earlier, failed.
        load_seconds: model loading (once); seconds: wall time of the whole call.
        cases_per_minute: predicted cases per minute of wall time after loading (None when none ran).
    """

    out_dir: Path
    summary_csv: Path
    rows: list[dict[str, Any]]
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    seconds: float = 0.0
    cases_per_minute: float | None = None


def predict_batch(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    onnx_model: str | os.PathLike | None = None,
    liver_checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    batch: int = 8,
    tta: bool = False,
    threshold: float = 0.5,
    labels: str = "tumor",
    output_format: str = "nifti",
    dicom: DicomOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    precision: str = "auto",
    save_probabilities: bool = False,
    postprocess: PostProcess | None = None,
    compile: bool = False,
    console=None,
) -> BatchResult:
    """Predict every case of ``sources`` into ``out_dir/<case_id>/`` and write ``summary.csv``.

    Args:
        sources: folders or files holding the cases (anything :func:`hepaseg.io.find_cases` expands).
        out_dir: a new or empty folder, or an earlier batch output of the same settings (resumed).
        checkpoint, onnx_model, liver_checkpoint, batch, tta, threshold, labels, device, precision,
        save_probabilities, postprocess, compile: as for :func:`~hepaseg.inference.pipeline.predict_case`
            (``checkpoint``/``liver_checkpoint``: one path or several, an ensemble loaded once).
        output_format: ``nifti`` | ``dicom-seg`` | ``both`` for every case (a SEG needs DICOM cases;
            other cases then fail with that message in the summary).
        dicom: ``--series`` / ``--seg-labels`` for DICOM cases (``--seg`` names the SEG of ONE case
            and is refused here).
        overwrite: predict finished cases again (and accept other settings than batch.json's).
        progress: a progress bar over cases.
        console: rich console for the bar (default: stderr).

    Returns:
        A :class:`BatchResult`.

    Raises:
        HepasegError: bad options, no cases, an ``out_dir`` holding files that are not a batch
            output, settings that differ from the resumed batch's, or an unloadable checkpoint.
            A failing CASE does not raise: it is an ``error`` row.
    """
    t_start = time.perf_counter()
    postprocess, checkpoints, liver_checkpoints = _check_options(
        checkpoint, liver_checkpoint, output_format=output_format, dicom=dicom, postprocess=postprocess)
    paths = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    cases = find_cases(paths)
    out_dir = Path(out_dir)
    # A batch folder is resumable (reuse), never one of the inputs, and only ever a batch output.
    check_output_dir(out_dir, command="predict-batch", inputs=[*paths, *checkpoints, onnx_model, *liver_checkpoints],
                     reuse=True)
    models = load_models(checkpoints, onnx_model, liver_checkpoints)
    settings = _settings(models, threshold=threshold, tta=tta, labels=labels, output_format=output_format,
                         dicom=dicom, save_probabilities=save_probabilities, postprocess=postprocess)
    marker = out_dir / BATCH_MARKER
    if marker.is_file() and not overwrite:
        _check_resumable(out_dir, json.loads(marker.read_text()), settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_output_marker(out_dir, "predict-batch")
    write_json_atomic(marker, settings)

    names = _case_names(cases)
    previous = _read_summary(out_dir / "summary.csv")
    result = BatchResult(out_dir=out_dir, summary_csv=out_dir / "summary.csv", rows=[], load_seconds=models.seconds)
    predict_options = dict(models=models, batch=batch, tta=tta, threshold=threshold, labels=labels,
                           device=device, precision=precision, output_format=output_format, dicom=dicom,
                           save_probabilities=save_probabilities, postprocess=postprocess, compile=compile)
    t_cases = time.perf_counter()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("predicting", total=len(cases))
        for path, name in zip(cases, names):
            bar.update(task, description=f"predicting {name}")
            result.rows.append(_case_row(path, name, out_dir / name, previous.get(name, {}), result,
                                         overwrite=overwrite, predict_options=predict_options))
            _write_summary(out_dir / "summary.csv", result.rows)
            bar.advance(task)
    run_seconds = time.perf_counter() - t_cases
    if result.predicted:
        result.cases_per_minute = 60.0 * len(result.predicted) / run_seconds
    result.seconds = time.perf_counter() - t_start
    return result


def _check_options(checkpoint, liver_checkpoint, *, output_format: str, dicom: DicomOptions | None,
                   postprocess: PostProcess | None) -> tuple[PostProcess, list[Path], list[Path]]:
    """The checked (postprocess, checkpoints, liver checkpoints); one-line errors before any work."""
    if output_format not in OUTPUT_FORMATS:
        raise HepasegError(f"--format: expected one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    if dicom is not None and dicom.seg:
        raise HepasegError(
            "--seg: names the SEG files of one case: expected a single case, got a folder of several. Put each "
            "case's SEG in its study folder (it is found there)"
        )
    postprocess = postprocess or PostProcess()
    checkpoints, liver_checkpoints = _paths(checkpoint), _paths(liver_checkpoint)
    if postprocess.needs_liver and not liver_checkpoints:
        postprocess_mask(np.zeros((1, 1, 1)), (1, 1, 1), postprocess)  # raises the one-line error
    return postprocess, checkpoints, liver_checkpoints


def _settings(models, *, threshold: float, tta: bool, labels: str, output_format: str, dicom: DicomOptions | None,
              save_probabilities: bool, postprocess: PostProcess) -> dict[str, Any]:
    """The content of :data:`BATCH_MARKER`: what a resumed batch must share with this one."""
    return {
        "format": "hepaseg-batch/1",
        "hepaseg_version": __version__,
        "model": models.model_name,
        "checkpoint_sha256": models.sha256,
        "liver_checkpoint_sha256": models.liver_sha256,
        "engine": models.engine,
        "threshold": float(threshold),
        "tta": bool(tta),
        "labels": labels,
        "output_format": output_format,
        "series": None if dicom is None else dicom.series,
        "seg_labels": None if dicom is None or dicom.seg_labels is None else str(dicom.seg_labels),
        "n_members": len(models.models),
        "save_probabilities": bool(save_probabilities),
        "postprocess": postprocess.as_dict(),
    }


def _check_resumable(out_dir: Path, before: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse to resume a batch (``before``: its marker) made with other settings than ``settings``."""
    changed = [k for k in _SETTING_KEYS if before.get(k, _SETTING_DEFAULTS.get(k)) != settings[k]]
    if changed:
        shown = ", ".join(f"{k} {before.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise HepasegError(
            f"{out_dir}: --out holds a batch made with other settings ({shown}): expected the same settings to "
            "resume it. Pass --overwrite to predict every case again, or choose another --out; nothing was "
            "written"
        )


def _case_row(path: Path, name: str, case_dir: Path, previous: dict, result: BatchResult, *, overwrite: bool,
              predict_options: dict[str, Any]) -> dict[str, Any]:
    """The summary row of one case: read back when done earlier, else predicted (an error row if that fails).

    The case's name is added to ``result.skipped``, ``result.predicted`` or ``result.failed``.
    """
    if (case_dir / "lesions.json").is_file() and not overwrite:
        result.skipped.append(name)
        return _row_from_files(name, path, case_dir, previous)
    t0 = time.perf_counter()
    try:
        # overwrite: the case folder is this batch's own output
        predicted = predict_case(path, case_dir, overwrite=True, progress=False, **predict_options)
        row = _row_from_result(name, path, predicted, time.perf_counter() - t0)
        result.predicted.append(name)
    except HepasegError as exc:
        row = _error_row(name, path, str(exc), time.perf_counter() - t0)
        result.failed.append(name)
    except Exception as exc:  # noqa: BLE001 - one broken case must not stop the batch
        row = _error_row(name, path, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
        result.failed.append(name)
    return row


def _paths(value) -> list[Path]:
    if value is None:
        return []
    return [Path(value)] if isinstance(value, (str, os.PathLike)) else [Path(v) for v in value]


def _case_names(cases: list[Path]) -> list[str]:
    """Output folder per case: its case id, made unique by appending -2, -3 ... in case order."""
    names: list[str] = []
    for path in cases:
        try:
            base = case_id_of(path)
        except HepasegError:
            base = path.name  # the case's own read reports the problem
        base = "".join(c if c.isalnum() or c in "._-" else "_" for c in base) or "case"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _series_text(series: dict | None) -> str:
    if not series:
        return ""
    number = "-" if series.get("number") is None else series["number"]
    return f"#{number} {series.get('description') or 'no description'} ({series.get('uid')})"


def _row(name: str, path: Path, status: str, lesions: list[dict], settings: dict, spacing, metrics: dict | None,
         seconds: float | None) -> dict[str, Any]:
    cascade = settings.get("cascade") or {}
    voxel_ml = float(spacing[0]) * float(spacing[1]) * float(spacing[2]) / 1000.0
    return {
        "case": name,
        "status": status,
        "source": str(path),
        "series": _series_text(settings.get("series")),
        "tumor_volume_ml": round(sum(float(r["volume_ml"]) for r in lesions), 4),
        "lesion_count": len(lesions),
        "largest_diameter_mm": round(max((float(r["max_axial_diameter_mm"]) for r in lesions), default=0.0), 2),
        "liver_volume_ml": round(cascade["liver_voxels"] * voxel_ml, 4) if "liver_voxels" in cascade else "",
        "dice": "" if metrics is None else round(float(metrics["dice"]), 6),
        "seconds": "" if seconds is None else round(seconds, 2),
        "error": "",
    }


def _row_from_result(name: str, path: Path, result: PredictResult, seconds: float) -> dict[str, Any]:
    return _row(name, path, "ok", result.lesions, result.settings, result.spacing, result.metrics, seconds)


def _row_from_files(name: str, path: Path, case_dir: Path, previous: dict) -> dict[str, Any]:
    info = json.loads((case_dir / "lesions.json").read_text())
    metrics_file = case_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    seconds = previous.get("seconds")
    row = _row(name, path, "done earlier", info["lesions"], info.get("settings", {}), info["spacing_mm"], metrics,
               float(seconds) if seconds not in (None, "") else None)
    return row


def _error_row(name: str, path: Path, message: str, seconds: float) -> dict[str, Any]:
    row = {key: "" for key in SUMMARY_COLUMNS}
    row.update({"case": name, "status": "error", "source": str(path), "seconds": round(seconds, 2),
                "error": message.replace("\n", " ")})
    return row


def _read_summary(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["case"]: row for row in csv.DictReader(fh)}


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())
