"""Aggregate per-slice metrics into the paper's Table 1 and write per-slice CSVs.

Table 1 of Pang et al. (PAKDD 2020) reports, per method, the mean over test slices of Dice,
Hausdorff distance, Jaccard, precision, recall and specificity, plus an F1 column. That F1
is not the mean of per-slice F1 scores: it is the harmonic mean of the *mean* precision and
the *mean* recall, ``F1 = 2 * P_mean * R_mean / (P_mean + R_mean)``: this rule reproduces 9 of the 10
printed rows to the second decimal; the paper's own MFCNet row computes to 83.47, not the
printed 83.37. :func:`summarize_slices`
returns that as ``f1`` and, for comparison, the mean of per-slice F1 as
``f1_mean_per_slice`` (which, under the empty-mask policy of
:mod:`hepaseg.evaluation.metrics`, equals the mean Dice).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from hepaseg.evaluation.metrics import SLICE_METRICS
from hepaseg.io.atomic import atomic_path

__all__ = ["TABLE1_COLUMNS", "f1_from_means", "summarize_slices", "table1_markdown", "write_slice_csv"]

#: Table 1 columns: (header, summary key, scale factor). Fractions are shown in percent,
#: the Hausdorff distance in pixels.
TABLE1_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("Dice (%)", "dice", 100.0),
    ("Hausdorff (px)", "hausdorff", 1.0),
    ("Jaccard (%)", "jaccard", 100.0),
    ("Precision (%)", "precision", 100.0),
    ("Recall (%)", "recall", 100.0),
    ("Specificity (%)", "specificity", 100.0),
    ("F1 (%)", "f1", 100.0),
)


def f1_from_means(precision: float, recall: float) -> float:
    """Harmonic mean ``2PR / (P + R)`` of two fractions; 0 when both are 0."""
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def summarize_slices(rows: Sequence[Mapping[str, float]]) -> dict[str, float | int]:
    """Mean and standard deviation over slices of every :data:`SLICE_METRICS` key.

    Args:
        rows: one :func:`~hepaseg.evaluation.metrics.slice_metrics` result per slice (extra
            keys such as ``case``/``slice`` are ignored).

    Returns:
        ``{<metric>: mean, <metric>_sd: sample sd (ddof=1; NaN for a single slice)}`` for
        each metric, plus ``f1`` (harmonic mean of mean precision and mean recall, the
        paper's F1), ``f1_mean_per_slice`` (mean of per-slice ``2PR/(P+R)``) and
        ``n_slices``.

    Raises:
        ValueError: if ``rows`` is empty, a row lacks a metric, or a value is NaN (every slice
            must count; see the empty-mask policy in :mod:`hepaseg.evaluation.metrics`).
    """
    if len(rows) == 0:
        raise ValueError("`rows` is empty: expected at least one slice_metrics() result.")
    table = np.empty((len(rows), len(SLICE_METRICS)), dtype=np.float64)
    for i, row in enumerate(rows):
        for j, key in enumerate(SLICE_METRICS):
            if key not in row:
                raise ValueError(
                    f"`rows[{i}]` lacks {key!r}: expected slice_metrics() keys {list(SLICE_METRICS)}, "
                    f"got {sorted(row)}."
                )
            value = float(row[key])
            if math.isnan(value):
                raise ValueError(
                    f"`rows[{i}][{key!r}]` is NaN: expected a number for every slice, since a NaN "
                    "would drop the slice from (or poison) the mean. Use slice_metrics()."
                )
            table[i, j] = value

    n = len(rows)
    summary: dict[str, float | int] = {}
    for j, key in enumerate(SLICE_METRICS):
        summary[key] = float(table[:, j].mean())
        summary[f"{key}_sd"] = float(table[:, j].std(ddof=1)) if n > 1 else math.nan
    summary["f1"] = f1_from_means(summary["precision"], summary["recall"])
    p, r = table[:, SLICE_METRICS.index("precision")], table[:, SLICE_METRICS.index("recall")]
    per_slice_f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    summary["f1_mean_per_slice"] = float(per_slice_f1.mean())
    summary["n_slices"] = n
    return summary


def _format_extra(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return str(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return f"{float(value):.2f}"
    return str(value)


def table1_markdown(
    results: Mapping[str, Mapping[str, float]],
    *,
    sd: Mapping[str, Mapping[str, float]] | None = None,
    extra: Mapping[str, Mapping[str, object]] | None = None,
) -> str:
    """Render results as a Markdown table in the layout of the paper's Table 1.

    Args:
        results: ``{method: summary}`` in row order; each summary needs the keys ``dice``,
            ``hausdorff``, ``jaccard``, ``precision``, ``recall``, ``specificity``, ``f1``
            (fractions and pixels, e.g. from :func:`summarize_slices`).
        sd: optional ``{method: {metric: sd}}``; cells become ``"mean ± sd"``. The metric's sd
            is looked up as ``metric + "_sd"``, else ``metric``, so ``sd=results`` works with
            :func:`summarize_slices` output. F1 (of the means) has no sd and stays plain; a
            method missing from ``sd`` gets plain cells.
        extra: optional extra columns appended after F1, ``{column header: {method: value}}``
            (e.g. ``{"Params (M)": {...}, "ms/slice": {...}}``); floats get 2 decimals, ints
            thousands separators, strings are kept, a missing method shows ``–``.

    Returns:
        The table as Markdown text ending in a newline. Fractions are printed as percentages
        with 2 decimals, the Hausdorff distance in pixels with 2 decimals.

    Raises:
        ValueError: if ``results`` is empty or a method lacks a metric.
    """
    if not results:
        raise ValueError("`results` is empty: expected {method: summary} with at least one method.")
    extra = dict(extra or {})
    header = ["Method", *(h for h, _, _ in TABLE1_COLUMNS), *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method, summary in results.items():
        method_sd = (sd or {}).get(method)
        cells = [str(method)]
        for _, key, scale in TABLE1_COLUMNS:
            if key not in summary:
                raise ValueError(
                    f"`results[{method!r}]` lacks {key!r}: expected the keys of summarize_slices(), "
                    f"got {sorted(summary)}."
                )
            cell = f"{float(summary[key]) * scale:.2f}"
            if method_sd is not None and key != "f1":
                # `<key>_sd` first, so that a summarize_slices() dict can be passed as is.
                dev = method_sd.get(f"{key}_sd", method_sd.get(key))
                if dev is not None:
                    cell += f" ± {float(dev) * scale:.2f}"
            cells.append(cell)
        cells.extend(_format_extra(column.get(method)) for column in extra.values())
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_slice_csv(rows: Sequence[Mapping[str, object]], path: str | os.PathLike) -> Path:
    """Write one CSV line per slice, atomically.

    Args:
        rows: dicts with ``case`` and ``slice`` (e.g. case id and z index) plus metric keys,
            typically ``{"case": ..., "slice": ..., **slice_metrics(p, t)}``.
        path: destination ``.csv``; written under a temporary name and renamed when complete.

    Returns:
        ``path`` as a :class:`~pathlib.Path`. Columns: ``case``, ``slice``, then the
        :data:`SLICE_METRICS` present, then any other keys in order of first appearance.
        Floats are written with full (round-trip) precision; a missing value is empty.

    Raises:
        ValueError: if ``rows`` is empty or a row lacks ``case`` or ``slice``.
    """
    if len(rows) == 0:
        raise ValueError("`rows` is empty: expected at least one per-slice result to write.")
    seen: dict[str, None] = {}
    for i, row in enumerate(rows):
        for key in ("case", "slice"):
            if key not in row:
                raise ValueError(
                    f"`rows[{i}]` lacks {key!r}: expected keys 'case' and 'slice' besides the metrics, "
                    f"got {sorted(row)}. Add them, e.g. {{'case': cid, 'slice': z, **slice_metrics(p, t)}}."
                )
        seen.update(dict.fromkeys(row))
    metrics = [k for k in SLICE_METRICS if k in seen]
    others = [k for k in seen if k not in ("case", "slice") and k not in SLICE_METRICS]
    fields = ["case", "slice", *metrics, *others]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (repr(float(v)) if isinstance(v, float | np.floating) else v) for k, v in row.items()}
            )
    return Path(path)
