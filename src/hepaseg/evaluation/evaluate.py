"""Evaluate a trained checkpoint on one split of a prepared slice dataset (``hepaseg evaluate``).

:func:`evaluate_checkpoint` rebuilds the network from its checkpoint alone
(:func:`hepaseg.training.load_checkpoint`, weights-only loading), runs it over every
slice of the split at the prepared resolution (``size x size`` pixels) in eval mode,
fp32 and without gradients, thresholds the sigmoid probability (tumour where
``p > threshold``, strictly, as :func:`hepaseg.inference.predictor.predict_volume`)
and scores each slice with :func:`hepaseg.evaluation.metrics.slice_metrics`.

Table 1 of Pang et al. (PAKDD 2020) averages the per-slice metrics over the test
slices. Its F1 column is NOT the mean of per-slice F1: it is the harmonic mean of the
mean precision and the mean recall, ``F1 = 2 * P_mean * R_mean / (P_mean + R_mean)``
(``f1``); the mean of per-slice F1 (``f1_mean_per_slice``, equal to the mean Dice under
our empty-mask policy) is reported beside it.

Outputs (``out``, default ``<checkpoint dir>/eval-<split>/``), each written atomically::

    .hepaseg-output.json  marker: an evaluate output (only such a folder is written into again)
    metrics.json   summary, per-case Dice, options, checkpoint info, timings (written last)
    slices.csv     one line per slice: case, slice (original z), every slice metric
    table.md       Table 1 layout, one row named after the model
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from hepaseg import __version__
from hepaseg.data import SPLITS, SliceDataset, read_manifest
from hepaseg.data.zval import val_note
from hepaseg.errors import HepasegError
from hepaseg.evaluation.ensemble import check_members, ensemble_name, ensemble_probabilities
from hepaseg.evaluation.metrics import slice_metrics
from hepaseg.evaluation.report import summarize_slices, table1_markdown, write_slice_csv
from hepaseg.io.atomic import write_json_atomic, write_text_atomic
from hepaseg.io.outputs import check_output_dir, write_output_marker

__all__ = [
    "EVAL_FORMAT",
    "F1_DEFINITION",
    "EvaluationResult",
    "check_data_options",
    "check_threshold",
    "evaluate_checkpoint",
    "json_safe",
    "predict_slices",
]

EVAL_FORMAT = "hepaseg-eval/1"
F1_DEFINITION = (
    "f1 = 2 * P_mean * R_mean / (P_mean + R_mean) of the mean precision and mean recall over slices "
    "(the paper's Table 1 F1); f1_mean_per_slice = mean over slices of 2PR/(P+R)"
)
#: Dataset options that must equal the checkpoint's for the input to mean the same thing.
_MATCHED_OPTIONS = ("window", "size", "context_slices")


@dataclass
class EvaluationResult:
    """What :func:`evaluate_checkpoint` measured (also in ``out/metrics.json``).

    ``rows`` has one dict per slice: ``case``, ``slice`` (original z index) and the
    :data:`~hepaseg.evaluation.metrics.SLICE_METRICS`. ``summary`` is
    :func:`~hepaseg.evaluation.report.summarize_slices` of them. ``per_case`` maps a case id
    to ``{"dice": pooled Dice of its slices at the prepared size, "mean_slice_dice", "n_slices"}``.
    """

    model_name: str
    checkpoint: Path
    data: Path
    split: str
    threshold: float
    summary: dict[str, float | int]
    rows: list[dict[str, Any]]
    per_case: dict[str, dict[str, float | int]]
    skipped_cases: list[str]
    timings: dict[str, float]
    checkpoint_info: dict[str, Any]
    options: dict[str, Any]
    demo_z_split: bool = False
    out_dir: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)  # every checkpoint of an ensemble (checkpoint = the first)
    val_note: str | None = None  # set when the dataset validates on z-blocks of training patients

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` content (NaN/inf made JSON-safe by :func:`json_safe`)."""
        return json_safe(
            {
                "format": EVAL_FORMAT,
                "hepaseg_version": __version__,
                "model": self.model_name,
                "checkpoint": {"path": str(self.checkpoint), **self.checkpoint_info},
                "members": self.members or [str(self.checkpoint)],
                "val_note": self.val_note,
                "data": str(self.data),
                "split": self.split,
                "demo_z_split": self.demo_z_split,
                "threshold": self.threshold,
                "options": self.options,
                "f1_definition": F1_DEFINITION,
                "summary": self.summary,
                "per_case": self.per_case,
                "skipped_cases": self.skipped_cases,
                "timings": self.timings,
            }
        )


def check_threshold(threshold: Any, option: str = "--threshold") -> float:
    """The one threshold rule of every command: a probability strictly between 0 and 1.

    Tumour is where ``sigmoid > threshold``: at 0 every pixel would be tumour (the sigmoid is
    never 0), at 1 none; both are mistakes, not choices. Returns ``float(threshold)``.

    Raises:
        HepasegError: naming ``option``.
    """
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value < 1.0:  # NaN fails too
        raise HepasegError(f"{option}: expected a probability with 0 < t < 1 (tumour where sigmoid > t), "
                           f"got {threshold!r}. Use e.g. 0.5")
    return value


def json_safe(obj: Any) -> Any:
    """Copy of ``obj`` that strict JSON parsers accept: NaN -> None, +-inf -> "inf"/"-inf"."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        value = float(obj)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def check_data_options(dataset_options: Mapping[str, Any], checkpoint_options: Mapping[str, Any], *,
                       data: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
    """Raise a one-line HepasegError when window, size or context_slices differ.

    A network trained on one window/size/context sees different inputs under another, so
    scores would be meaningless; the fix is to prepare the data the checkpoint's way.
    """
    for key in _MATCHED_OPTIONS:
        want, got = checkpoint_options.get(key), dataset_options.get(key)
        if want is None:
            continue  # an old checkpoint without the option: nothing to check against
        same = (
            [float(v) for v in want] == [float(v) for v in got] if key == "window" and got is not None
            else want == got
        )
        if not same:
            fix = _prepare_flags(checkpoint_options)
            raise HepasegError(
                f"{Path(data) / 'manifest.json'}: {key} differs from the checkpoint's: expected {want!r} "
                f"(as {checkpoint} was trained), got {got!r}. Re-prepare the data with `hepaseg prepare ... "
                f"{fix}`"
            )


def _prepare_flags(options: Mapping[str, Any]) -> str:
    """``hepaseg prepare`` flags that reproduce ``options`` (window, size, context_slices)."""
    flags = []
    if options.get("window") is not None:
        flags.append("--window " + ",".join(f"{float(v):g}" for v in options["window"]))
    if options.get("size") is not None:
        flags.append(f"--size {options['size']}")
    if options.get("context_slices") is not None:
        flags.append(f"--context-slices {options['context_slices']}")
    return " ".join(flags)


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """No TF32 and deterministic cuDNN kernels while evaluating on CUDA (fp32 results repeat
    exactly); the global flags are restored afterwards."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark)
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


def predict_slices(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    dataset: torch.utils.data.Dataset,
    *,
    batch: int = 8,
    threshold: float = 0.5,
    device: str | torch.device = "cpu",
    tta: bool = False,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Binary predictions and targets for every item of a slice dataset, in dataset order.

    Args:
        model: network mapping ``(N, C, S, S)`` float32 to logits ``(N, 1, S, S)``, or a list of
            them (an ensemble: the sigmoid probabilities are averaged,
            :func:`hepaseg.evaluation.ensemble.ensemble_probabilities`); run in eval mode, fp32,
            under ``torch.no_grad``.
        dataset: items ``(image (C, S, S), mask (1, S, S))`` (a :class:`SliceDataset` or a subset).
        batch: slices per forward pass (>= 1); results do not depend on it.
        threshold: tumour where ``sigmoid(logit) > threshold`` (strictly greater).
        device: where the network runs.
        tta: also average the horizontal and vertical flips.

    Returns:
        ``(pred, target, forward_seconds)``: ``pred`` and ``target`` bool ``(N, S, S)``, and
        the wall time spent in forward passes (data loading excluded).
    """
    device = torch.device(device)
    models = [m.to(device).float().eval() for m in (model if isinstance(model, (list, tuple)) else [model])]
    preds, targets = [], []
    forward_s = 0.0
    with _exact_fp32(), torch.no_grad():
        for image, mask in DataLoader(dataset, batch_size=batch, shuffle=False):
            x = image.to(device=device, dtype=torch.float32)
            t0 = time.perf_counter()
            prob = ensemble_probabilities(models, x, tta=tta).mean  # (n, S, S)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # count the kernels, not just their launch
            forward_s += time.perf_counter() - t0
            preds.append((prob > threshold).cpu().numpy())
            targets.append(mask[:, 0].numpy() > 0.5)
    return np.concatenate(preds), np.concatenate(targets), forward_s


def _per_case(rows: list[dict[str, Any]], pred: np.ndarray, target: np.ndarray) -> dict[str, dict[str, Any]]:
    """Pooled Dice (``2|P & T| / (|P| + |T|)``, 1 when both are empty) of each case's slices."""
    out: dict[str, dict[str, Any]] = {}
    sums: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        s = sums.setdefault(row["case"], [0, 0, 0, 0])
        s[0] += int(np.count_nonzero(pred[i] & target[i]))
        s[1] += int(np.count_nonzero(pred[i]))
        s[2] += int(np.count_nonzero(target[i]))
        s[3] += 1
    for case, (inter, n_pred, n_target, n) in sums.items():
        dices = [r["dice"] for r in rows if r["case"] == case]
        out[case] = {
            "dice": 1.0 if n_pred + n_target == 0 else 2 * inter / (n_pred + n_target),
            "mean_slice_dice": float(np.mean(dices)),
            "n_slices": n,
            "intersection": inter,
            "pred_pixels": n_pred,
            "target_pixels": n_target,
        }
    return out


def evaluate_checkpoint(
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike],
    data: str | os.PathLike,
    *,
    split: str = "test",
    batch: int = 8,
    threshold: float = 0.5,
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    write: bool = True,
    tta: bool = False,
) -> EvaluationResult:
    """Score a checkpoint on every labelled slice of one split, as in the paper's Table 1.

    Args:
        checkpoint: ``RUN/best.ckpt`` (or ``last.ckpt``) written by ``hepaseg train``, or several:
            an ensemble whose probabilities are averaged (members must share their data options).
        data: prepared dataset directory (``hepaseg prepare`` output); its window, size and
            context_slices must equal the checkpoint's ``data_options``.
        split: ``"test"`` (default), ``"val"`` or ``"train"``.
        batch: slices per forward pass (default 8; >= 1). Results do not depend on it.
        threshold: probability with ``0 < threshold < 1``; tumour where ``sigmoid > threshold``
            (default 0.5; :func:`check_threshold`).
        out: output directory (default ``<checkpoint dir>/eval-<split>/``, or
            ``eval-<split>-ensemble/`` beside the first of several); files in it are replaced
            atomically, ``metrics.json`` last.
        device: ``None`` (default: CUDA when available, else CPU), ``"cpu"``, ``"cuda"``...
            Always fp32 (TF32 off, deterministic cuDNN), so results repeat exactly on one device.
        write: write the output files (default True).
        tta: average the identity and the horizontal and vertical flips (default False).

    Returns:
        An :class:`EvaluationResult`. Its ``summary`` holds the mean and sd over slices of
        Dice, Jaccard, precision, recall, specificity (fractions), Hausdorff and HD95 (pixels
        at the prepared size), ``f1`` = ``2 P R / (P + R)`` of the MEAN precision P and MEAN
        recall R (the paper's F1) and ``f1_mean_per_slice`` (the mean of per-slice F1).
        ``timings`` (seconds) holds ``load``, ``forward``, ``metrics``, ``total`` and
        ``ms_per_slice`` (forward time per slice).

    Cases whose manifest entry says ``has_label: false`` are skipped (listed in
    ``skipped_cases``): their all-zero label is not a reference.

    Raises:
        HepasegError: missing/corrupt checkpoint or data, option mismatch between them, a
            split without labelled slices, or ``split``, ``batch``, ``threshold`` out of range.

    Example::

        result = evaluate_checkpoint("runs/mfcnet/best.ckpt", "prepared")
        result.summary["dice"], result.summary["f1"]
    """
    t_start = time.perf_counter()
    threshold, members = _check_options(checkpoint, split=split, batch=batch, threshold=threshold)
    checkpoint, data = members[0], Path(data)
    default = f"eval-{split}" if len(members) == 1 else f"eval-{split}-ensemble"
    out_dir = Path(out) if out is not None else checkpoint.parent / default
    if write:  # before any work: an earlier evaluate output is updated, anything else refused
        check_output_dir(out_dir, command="evaluate", inputs=[*members, data], reuse=True)
    manifest, all_loaded = _load(data, members)
    loaded = all_loaded[0]
    target = loaded.data_options.get("target") or "tumor"
    dataset = SliceDataset(data, split, augment=False, target=target)
    keep, skipped = _labelled_slices(manifest, dataset, data=data, split=split)
    t_loaded = time.perf_counter()

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pred, truth, forward_s = predict_slices([m.model for m in all_loaded], Subset(dataset, keep), batch=batch,
                                            threshold=float(threshold), device=dev, tta=tta)
    t_pred = time.perf_counter()
    rows = []
    for k, i in enumerate(keep):
        case_id, z = dataset.slice_keys[i]
        rows.append({"case": case_id, "slice": z, **slice_metrics(pred[k], truth[k])})
    summary = summarize_slices(rows)
    per_case = _per_case(rows, pred, truth)
    t_metrics = time.perf_counter()

    result = EvaluationResult(
        model_name=ensemble_name([m.model_name for m in all_loaded]),
        checkpoint=checkpoint,
        data=data,
        split=split,
        threshold=float(threshold),
        summary=summary,
        rows=rows,
        per_case=per_case,
        skipped_cases=skipped,
        timings={
            "load": t_loaded - t_start,
            "forward": forward_s,
            "metrics": t_metrics - t_pred,
            "total": t_metrics - t_start,  # updated after writing
            "ms_per_slice": 1000.0 * forward_s / len(rows),
        },
        checkpoint_info=_checkpoint_info(loaded),
        options={"batch": batch, "device": str(dev), "precision": "fp32", "target": target, "tta": bool(tta),
                 "n_members": len(members),
                 "data_options": {k: manifest["options"].get(k) for k in (*_MATCHED_OPTIONS, "slices")}},
        demo_z_split=bool(manifest.get("demo_z_split", False)),
        members=[str(c) for c in members],
        val_note=val_note(manifest),
    )
    if write:
        _write_outputs(result, out_dir)
        result.timings["total"] = time.perf_counter() - t_start
        # metrics.json last: its presence means the evaluation is complete.
        write_json_atomic(out_dir / "metrics.json", result.to_json())
        result.paths["metrics"] = out_dir / "metrics.json"
    return result


def _check_options(checkpoint, *, split: str, batch: int, threshold: float) -> tuple[float, list[Path]]:
    """The checked (threshold, member checkpoints), before any work."""
    # HepasegError, not ValueError: these come straight from the command line.
    if split not in SPLITS:
        raise HepasegError(f"--split: invalid value: expected one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise HepasegError(f"--batch: invalid value: expected a positive integer, got {batch!r}")
    threshold = check_threshold(threshold)
    members = [Path(checkpoint)] if isinstance(checkpoint, (str, os.PathLike)) else [Path(c) for c in checkpoint]
    if not members:
        raise HepasegError("--checkpoint: expected at least one checkpoint from `hepaseg train`, got none")
    return threshold, members


def _load(data: Path, members: list[Path]) -> tuple[dict[str, Any], list[Any]]:
    """(manifest, loaded members): the members share data options, which match the dataset's."""
    from hepaseg.training import load_checkpoint  # training sits above evaluation in the chain

    if not data.is_dir():
        raise HepasegError(f"{data}: data directory not found: expected a directory written by "
                           "`hepaseg prepare`. Check --data or run `hepaseg prepare SOURCES --out DIR`")
    manifest = read_manifest(data)
    all_loaded = [load_checkpoint(c) for c in members]
    check_members([m.data_options for m in all_loaded], [str(c) for c in members])
    check_data_options(manifest["options"], all_loaded[0].data_options, data=data, checkpoint=members[0])
    return manifest, all_loaded


def _labelled_slices(manifest: Mapping[str, Any], dataset: SliceDataset, *, data: Path,
                     split: str) -> tuple[list[int], list[str]]:
    """(indices of the dataset's slices whose case has a label, ids of the unlabelled cases skipped)."""
    labelled = {c["id"]: bool(c.get("has_label", True)) for c in manifest["cases"]}
    skipped = [cid for cid in dataset.case_ids if not labelled.get(cid, True)]
    keep = [i for i, (cid, _) in enumerate(dataset.slice_keys) if labelled.get(cid, True)]
    if not keep:
        raise HepasegError(
            f"{data / 'manifest.json'}: split {split!r} has no labelled slices: expected cases with "
            f"has_label true, got only unlabelled ones ({', '.join(skipped)}). Evaluate on labelled data"
        )
    return keep, skipped


def _checkpoint_info(loaded) -> dict[str, Any]:
    """The checkpoint's model and training record, for ``metrics.json``."""
    return {
        "model": loaded.model_name,
        "model_options": loaded.model_options,
        "base_width": loaded.base_width,
        "in_channels": loaded.in_channels,
        "data_options": loaded.data_options,
        "metrics": loaded.metrics,
        "version": loaded.version,
    }


def _write_outputs(result: EvaluationResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_output_marker(out_dir, "evaluate")
    result.out_dir = out_dir
    result.paths["slices"] = write_slice_csv(result.rows, out_dir / "slices.csv")
    s = result.summary
    lines = [
        f"# {result.model_name} on the {result.split} split of {result.data}",
        "",
        table1_markdown({result.model_name: s}, sd={result.model_name: s}).rstrip("\n"),
        "",
        (f"Mean ± sd over {s['n_slices']} slices at the prepared size ({result.options['data_options']['size']} px); "
        f"threshold {result.threshold:g}; checkpoint `{result.checkpoint}`."),
        (f"F1 is the paper's: 2PR/(P+R) of the mean precision and mean recall ({100 * s['f1']:.2f} %); "
        f"the mean of per-slice F1 is {100 * s['f1_mean_per_slice']:.2f} %."),
    ]
    if result.skipped_cases:
        lines.append(f"Skipped unlabelled cases: {', '.join(result.skipped_cases)}.")
    if result.demo_z_split:
        lines.append("Warning: demo z-split (contiguous z blocks of one patient), not a patient-level split; "
                     "scores are optimistic.")
    if result.val_note is not None:
        lines.append(("Warning: " if result.split == "val" else "Note: ") + result.val_note + ".")
    if len(result.members) > 1 or result.options.get("tta"):
        lines.append(f"Ensemble of {len(result.members)} checkpoint(s) (probabilities averaged"
                     f"{' over members and flips' if result.options.get('tta') else ''}): "
                     + ", ".join(f"`{m}`" for m in result.members) + ".")
    result.paths["table"] = write_text_atomic(out_dir / "table.md", "\n".join(lines) + "\n")
