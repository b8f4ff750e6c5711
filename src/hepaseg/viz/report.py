"""A self-contained HTML report of a demo or experiment (``hepaseg demo`` writes ``report.html``).

Self-contained means the file can be mailed or opened offline: the CSS is inline,
every figure is embedded as a ``data:image/png;base64`` URI, and there are no
scripts and no links to other files or sites. Every string that goes into the
page (case ids, paths, commands, lesion values) is HTML-escaped, so a case id such
as ``<script>`` shows as text and never runs.

The page shows, in order: the title, a warning box (e.g. the demo's single-patient
z-split, in bold), the Table-1-style comparison (the paper's columns, formatted as
:func:`hepaseg.evaluation.table1_markdown` does, plus extra columns such as params
and ms/slice), training curves, the whole-volume prediction (volume metrics,
overlay, lesion table), the explanation figure, step timings, and the commands
that reproduce each step.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from hepaseg import __version__
from hepaseg.errors import HepasegError
from hepaseg.evaluation.report import TABLE1_COLUMNS
from hepaseg.io.atomic import atomic_path

__all__ = ["ReportContent", "ReportFigure", "png_data_uri", "render_report", "write_report"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Volume metrics shown for the prediction: (key, header, scale, unit suffix, decimals).
_VOLUME_ROWS: tuple[tuple[str, str, float, str, int], ...] = (
    ("dice", "Dice", 100.0, " %", 2),
    ("jaccard", "Jaccard", 100.0, " %", 2),
    ("rvd", "Relative volume difference (RVD)", 100.0, " %", 2),
    ("assd", "ASSD", 1.0, " mm", 2),
    ("hd95", "HD95", 1.0, " mm", 2),
    ("hausdorff", "Hausdorff", 1.0, " mm", 2),
    ("pred_voxels", "Predicted tumour voxels", 1.0, "", 0),
    ("target_voxels", "Reference tumour voxels", 1.0, "", 0),
    ("intersection", "Overlap voxels", 1.0, "", 0),
)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.meta { color: #666; font-size: 0.9em; }
.warning { background: #fff4e5; border: 2px solid #e69500; border-radius: 6px; padding: 0.8em 1em; margin: 1em 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; border-radius: 4px; padding: 0.6em; overflow-x: auto;
      white-space: pre-wrap; word-break: break-all; font-size: 0.85em; }
.note { color: #444; font-size: 0.92em; }
"""


@dataclass(kw_only=True)
class ReportFigure:
    """One embedded PNG: ``path`` is read and inlined as a data URI when the report is rendered."""

    path: str | os.PathLike
    title: str
    caption: str = ""


@dataclass(kw_only=True)
class ReportContent:
    """Everything the report shows; all strings are escaped when rendered.

    Attributes:
        title: page title (``<title>`` and ``<h1>``).
        subtitle: one line under the title (e.g. the case and data source).
        warning: shown in bold in a box at the top (e.g. the demo z-split); None: no box.
        table1: ``{method: summary}`` with the keys of :data:`TABLE1_COLUMNS` (fractions,
            Hausdorff in pixels), e.g. :func:`hepaseg.evaluation.summarize_slices` output.
        table1_extra: extra columns after F1, ``{header: {method: value}}`` (ints get thousands
            separators, floats 2 decimals, strings as given, missing -> ``–``).
        table1_note: a paragraph under the table (what was evaluated, how many slices).
        curves: training-curves figure or None.
        slice_dice: per-slice test Dice figure (shown under Table 1) or None.
        volume_metrics: ``volume_metrics()`` of the predicted volume (fractions, mm, voxel counts).
        volume_note: a paragraph about what the prediction covers.
        overlay: overlay figure of the prediction or None.
        lesions: ``lesion_table()`` rows (``id``, ``voxels``, ``volume_ml``, ``centroid_mm``,
            ``max_axial_diameter_mm``, ``first_slice``, ``last_slice``).
        explanation: explanation figure or None.
        timings: ``{step: seconds}`` in display order.
        commands: ``[(step, shell command)]`` that reproduce each step.
        details: ``{name: value}`` settings shown as a small table (sizes, widths, seeds...).
    """

    title: str
    subtitle: str = ""
    warning: str | None = None
    table1: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    table1_extra: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    table1_note: str = ""
    curves: ReportFigure | None = None
    slice_dice: ReportFigure | None = None
    volume_metrics: Mapping[str, object] | None = None
    volume_note: str = ""
    overlay: ReportFigure | None = None
    lesions: Sequence[Mapping[str, object]] = ()
    explanation: ReportFigure | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    commands: Sequence[tuple[str, str]] = ()
    details: Mapping[str, object] = field(default_factory=dict)


def _e(value: object) -> str:
    """HTML-escape any value's text (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def png_data_uri(path: str | os.PathLike) -> str:
    """``data:image/png;base64,...`` of a PNG file.

    Raises:
        HepasegError: the file is missing or is not a PNG.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HepasegError(f"{path}: cannot read the figure ({exc.strerror}): expected a PNG file.") from None
    if not data.startswith(_PNG_SIGNATURE):
        raise HepasegError(f"{path}: not a PNG: expected the PNG signature, got {data[:8]!r}. Save figures as PNG.")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _number(value: object, scale: float = 1.0, decimals: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    try:
        x = float(value) * scale  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return _e(value)
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:,.{decimals}f}" if decimals == 0 else f"{x:.{decimals}f}"


def _extra_cell(value: object) -> str:
    # The same rules as evaluation.report.table1_markdown's extra columns.
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _number(value)
    return _e(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """An HTML table; ``header`` is escaped here, cells must be escaped by the caller."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _table1(content: ReportContent) -> str:
    header = ["Method", *(h for h, _, _ in TABLE1_COLUMNS), *content.table1_extra]
    rows = []
    for method, summary in content.table1.items():
        missing = [key for _, key, _ in TABLE1_COLUMNS if key not in summary]
        if missing:
            raise ValueError(
                f"`table1[{method!r}]` lacks {missing}: expected the keys of summarize_slices(), got {sorted(summary)}."
            )
        cells = [_e(method)]
        cells += [_number(summary[key], scale) for _, key, scale in TABLE1_COLUMNS]
        cells += [_extra_cell(column.get(method)) for column in content.table1_extra.values()]
        rows.append(cells)
    return _table(header, rows)


def _figure(fig: ReportFigure) -> str:
    caption = f"<figcaption>{_e(fig.caption)}</figcaption>" if fig.caption else ""
    return (
        f"<h3>{_e(fig.title)}</h3><figure><img alt=\"{_e(fig.title)}\" src=\"{png_data_uri(fig.path)}\">"
        f"{caption}</figure>"
    )


def _lesion_table(lesions: Sequence[Mapping[str, object]]) -> str:
    if not lesions:
        return '<p class="note">No lesion predicted.</p>'
    header = ["Lesion", "Voxels", "Volume (mL)", "Max axial diameter (mm)", "Centroid z, y, x (mm)", "Slices"]
    rows = []
    for row in lesions:
        centroid = row.get("centroid_mm") or ()
        rows.append([
            _e(row.get("id", "")),
            _number(row.get("voxels"), decimals=0),
            _number(row.get("volume_ml"), decimals=3),
            _number(row.get("max_axial_diameter_mm"), decimals=1),
            _e(", ".join(_number(v, decimals=1) for v in centroid)),  # type: ignore[union-attr]
            _e(f"{row.get('first_slice', '')}–{row.get('last_slice', '')}"),
        ])
    return _table(header, rows)


def render_report(content: ReportContent) -> str:
    """The report as one HTML string (figures read and embedded now).

    Raises:
        ValueError: a Table-1 row lacks a metric.
        HepasegError: a figure file is missing or not a PNG.
    """
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(content.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(content.title)}</h1>",
        (
            f'<p class="meta">{_e(content.subtitle)}{" · " if content.subtitle else ""}'
            f"hepaseg {_e(__version__)} · {_e(stamp)}</p>"
        ),
    ]
    if content.warning:
        parts.append(f'<div class="warning"><strong>{_e(content.warning)}</strong></div>')
    if content.table1:
        parts += ["<h2>Table 1: test slices</h2>", _table1(content)]
        if content.table1_note:
            parts.append(f'<p class="note">{_e(content.table1_note)}</p>')
    if content.slice_dice is not None:
        parts.append(_figure(content.slice_dice))
    if content.curves is not None:
        parts += ["<h2>Training</h2>", _figure(content.curves)]
    if content.volume_metrics is not None or content.overlay is not None or content.lesions:
        parts.append("<h2>Whole-volume prediction</h2>")
        if content.volume_note:
            parts.append(f'<p class="note">{_e(content.volume_note)}</p>')
        if content.volume_metrics is not None:
            rows = [
                [_e(name), _number(content.volume_metrics[key], scale, decimals) + _e(unit)]
                for key, name, scale, unit, decimals in _VOLUME_ROWS
                if key in content.volume_metrics
            ]
            parts += ["<h3>Volume metrics</h3>", _table(["Metric", "Value"], rows)]
        if content.overlay is not None:
            parts.append(_figure(content.overlay))
        parts += ["<h3>Lesions</h3>", _lesion_table(content.lesions)]
    if content.explanation is not None:
        parts += ["<h2>Explanation</h2>", _figure(content.explanation)]
    if content.timings:
        rows = [[_e(step), _number(seconds, decimals=1)] for step, seconds in content.timings.items()]
        parts += ["<h2>Timings</h2>", _table(["Step", "Seconds"], rows)]
    if content.commands:
        parts.append("<h2>Reproduce each step</h2>")
        for step, command in content.commands:
            parts.append(f"<h3>{_e(step)}</h3><pre><code>{_e(command)}</code></pre>")
    if content.details:
        rows = [[_e(k), _e(v)] for k, v in content.details.items()]
        parts += ["<h2>Settings</h2>", _table(["Setting", "Value"], rows, numeric_from=2)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(content: ReportContent, path: str | os.PathLike) -> Path:
    """Render ``content`` and write it to ``path`` atomically; returns ``Path(path)``."""
    text = render_report(content)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # the page declares utf-8; never the locale's encoding
    return Path(path)
