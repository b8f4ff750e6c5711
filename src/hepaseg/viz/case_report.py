"""The per-case HTML report of ``hepaseg predict --report`` (``OUT/report.html``).

One self-contained file -- inline CSS and JavaScript, every image a base64 ``data:`` URI,
no link to another file or site, no server -- that shows, in order:

* the case (id, source, shape, spacing, orientation) and any warning of the prediction;
* the command that made it, the model(s) (name, options, checkpoint file with its size and
  SHA-256) and the versions of hepaseg, Python, NumPy, torch (and onnxruntime);
* the metrics against the reference, when the input is labelled;
* an axial montage of up to :data:`MONTAGE_SLICES` slices (those with the most tumour, in
  the prediction or the reference): the CT, the prediction, the reference when there is
  one, and the uncertainty when an uncertainty array is given;
* a slice browser: a slider over every slice with the prediction (red), the reference
  (green) and a predicted liver (yellow) outlined, a strip marking the slices that hold
  tumour (click it to jump), the arrow keys, and ``report.html#slice=K`` (0-based) to open
  at slice ``K`` (``#slice=K&browser-only`` hides everything but the browser, e.g. for a
  screenshot). The page exposes ``window.hepasegShowSlice(k)`` for scripted checks;
* the lesion table (``lesions.csv``'s rows) with a thumbnail of each lesion on its slice
  of largest diameter.

Orientation: the arrays are hepaseg's canonical LPS (slices inferior -> superior, rows
anterior -> posterior, columns patient right -> left), shown as stored, which is the
radiological view: the patient's right (the liver) on the image's left, anterior at the
top, the spine at the bottom. Pixels are drawn with their physical aspect ratio.

Size: browser frames are JPEG (quality :data:`JPEG_QUALITY`) at :data:`BROWSER_PX` pixels
wide; a 129-slice 512 x 512 case makes a page of about 2-3 MB. Every string placed in
the page is HTML-escaped; JSON inside ``<script>`` has ``<``, ``>`` and ``&`` escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from hepaseg import __version__
from hepaseg.errors import HepasegError
from hepaseg.io.atomic import atomic_path

__all__ = [
    "BROWSER_PX",
    "CaseReport",
    "MONTAGE_SLICES",
    "predict_report",
    "render_case_report",
    "write_case_report",
]

BROWSER_PX = 256  # width of a slice-browser frame, pixels
MONTAGE_PX = 256  # width of a montage panel, pixels
THUMB_PX = 112  # width of a lesion thumbnail, pixels
MONTAGE_SLICES = 6
MAX_THUMBNAILS = 200  # lesions beyond this are listed without a thumbnail (keeps the page small)
JPEG_QUALITY = 82
DISPLAY_WINDOW_HU = (-160.0, 240.0)  # abdominal soft-tissue window: level 40, width 400

PRED_RGB = (255, 48, 48)
REF_RGB = (40, 220, 40)
LIVER_RGB = (255, 205, 0)

#: Metrics rows shown: (key, header, scale, unit suffix, decimals).
_METRIC_ROWS: tuple[tuple[str, str, float, str, int], ...] = (
    ("dice", "Dice", 100.0, " %", 2),
    ("jaccard", "Jaccard", 100.0, " %", 2),
    ("rvd", "Relative volume difference", 100.0, " %", 2),
    ("assd", "ASSD", 1.0, " mm", 2),
    ("hd95", "HD95", 1.0, " mm", 2),
    ("hausdorff", "Hausdorff", 1.0, " mm", 2),
    ("pred_voxels", "Predicted voxels", 1.0, "", 0),
    ("target_voxels", "Reference voxels", 1.0, "", 0),
)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #1d1d1f; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.meta, .note { color: #555; font-size: 0.9em; }
.warning { background: #fff4e5; border: 2px solid #e69500; border-radius: 6px; padding: 0.5em 1em; margin: 0.6em 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; vertical-align: middle; }
th { background: #f3f3f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; border-radius: 4px; padding: 0.6em; white-space: pre-wrap;
      word-break: break-all; font-size: 0.85em; }
.montage td { border: none; padding: 2px; text-align: center; font-size: 0.85em; color: #444; }
.montage img, #browser-img, .thumb { background: #000; display: block; }
.legend span { display: inline-block; margin-right: 1.2em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: -0.1em; margin-right: 0.3em; }
#browser { display: flex; gap: 1.2em; align-items: flex-start; flex-wrap: wrap; }
#browser-controls { min-width: 280px; flex: 1; }
#slice-slider { width: 100%; }
#slice-strip { width: 100%; height: 22px; display: block; cursor: pointer; border: 1px solid #ccc; }
#slice-label { font-variant-numeric: tabular-nums; font-size: 0.95em; margin: 0.4em 0; }
body.browser-only > :not(#browser-section):not(#browser):not(script) { display: none; }
"""

# The slice browser: frames are JSON in <script type="application/json"> (parsed once, never eval'd).
_BROWSER_JS = """
(function () {
  var frames = JSON.parse(document.getElementById('browser-frames').textContent);
  var meta = JSON.parse(document.getElementById('browser-meta').textContent);
  var img = document.getElementById('browser-img');
  var slider = document.getElementById('slice-slider');
  var label = document.getElementById('slice-label');
  var strip = document.getElementById('slice-strip');
  function show(k) {
    k = Math.max(0, Math.min(frames.length - 1, Math.round(Number(k)) || 0));
    img.src = frames[k];
    slider.value = String(k);
    var text = 'slice ' + k + ' of 0\\u2013' + (frames.length - 1) + ' \\u00b7 z = ' + meta.z_mm[k].toFixed(1) +
      ' mm \\u00b7 predicted tumour ' + meta.pred[k] + ' px';
    if (meta.ref) { text += ' \\u00b7 reference ' + meta.ref[k] + ' px'; }
    label.textContent = text;
    document.body.setAttribute('data-slice', String(k));
    return k;
  }
  window.hepasegShowSlice = show;
  slider.addEventListener('input', function () { show(slider.value); });
  strip.addEventListener('click', function (event) {
    var box = strip.getBoundingClientRect();
    show(Math.floor((event.clientX - box.left) / box.width * frames.length));
  });
  function fromHash() {
    var hash = window.location.hash;
    var only = /browser-only/.test(hash);
    document.body.classList.toggle('browser-only', only);
    var m = /slice=(\\d+)/.exec(hash);
    if (m) { show(m[1]); }
    if (m && !only) { document.getElementById('browser-section').scrollIntoView(); }
    return Boolean(m);
  }
  window.addEventListener('hashchange', fromHash);
  if (!fromHash()) { show(meta.start); }
})();
"""


@dataclass(kw_only=True)
class CaseReport:
    """Everything :func:`render_case_report` shows (strings are escaped when rendered).

    Attributes:
        case_id: the case's id (title).
        image: ``(z, y, x)`` CT in HU, canonical LPS (module docstring).
        spacing: voxel size in mm, ``(z, y, x)``.
        prediction: ``(z, y, x)`` predicted tumour, nonzero = tumour.
        reference: ``(z, y, x)`` reference tumour (label == 2), or None when unlabelled.
        liver: ``(z, y, x)`` predicted liver (cascade), or None.
        uncertainty: ``(z, y, x)`` float >= 0 (e.g. the standard deviation of the tumour
            probability over ensemble members and flips), or None: adds a montage column.
        uncertainty_label: the column's heading (what the array is).
        lesions: :func:`hepaseg.inference.lesions.lesion_table` rows of ``prediction``.
        metrics: volume metrics vs the reference (fractions, mm); an optional ``"liver"``
            entry of the same form; None when unlabelled.
        command: the command line that made the prediction.
        models: one mapping per model (role, name, options, checkpoint, ...), shown as rows.
        versions: ``{package: version}``; hepaseg, Python and NumPy are added.
        details: ``{name: value}`` about the case (source, shape, spacing, orientation...).
        warnings: shown in boxes at the top.
        timings: ``{step: seconds}``.
    """

    case_id: str
    image: np.ndarray
    spacing: Sequence[float]
    prediction: np.ndarray
    reference: np.ndarray | None = None
    liver: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    uncertainty_label: str = "uncertainty"
    lesions: Sequence[Mapping[str, Any]] = ()
    metrics: Mapping[str, Any] | None = None
    command: str = ""
    models: Sequence[Mapping[str, Any]] = ()
    versions: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    warnings: Sequence[str] = ()
    timings: Mapping[str, float] = field(default_factory=dict)


# --- images --------------------------------------------------------------------------------------


def _check(case: CaseReport) -> None:
    image = np.asarray(case.image)
    if image.ndim != 3 or min(image.shape) < 1:
        raise ValueError(f"image: expected a (z, y, x) volume, got shape {image.shape}")
    if len(case.spacing) != 3 or not all(float(s) > 0 for s in case.spacing):
        raise ValueError(f"spacing: expected three positive mm values (z, y, x), got {tuple(case.spacing)}")
    for name in ("prediction", "reference", "liver", "uncertainty"):
        value = getattr(case, name)
        if value is not None and np.shape(value) != image.shape:
            raise ValueError(f"{name}: expected the image's shape {image.shape}, got {np.shape(value)}")
    if case.uncertainty is not None:
        u = np.asarray(case.uncertainty)
        if not np.isfinite(u).all() or (u < 0).any():
            raise ValueError("uncertainty: expected finite values >= 0")


def _display_size(shape_yx: tuple[int, int], spacing_yx: Sequence[float], width: int) -> tuple[int, int]:
    """(height, width) in display pixels keeping the physical aspect ratio."""
    h_mm, w_mm = shape_yx[0] * float(spacing_yx[0]), shape_yx[1] * float(spacing_yx[1])
    return max(1, round(width * h_mm / w_mm)), width


def _gray(slice_hu: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """The slice in the display window as ``(h, w, 3)`` uint8, resized (bilinear) to ``size_hw``."""
    from PIL import Image

    lo, hi = DISPLAY_WINDOW_HU
    g = np.clip((np.asarray(slice_hu, np.float32) - lo) / (hi - lo), 0.0, 1.0)
    img = Image.fromarray((g * 255.0 + 0.5).astype(np.uint8), mode="L").resize(size_hw[::-1], Image.BILINEAR)
    return np.repeat(np.asarray(img)[:, :, None], 3, axis=2)


def _resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray((np.asarray(mask) != 0).astype(np.uint8) * 255, mode="L")
    return np.asarray(img.resize(size_hw[::-1], Image.NEAREST)) > 0


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's inner border, 2 display pixels thick (visible at 256 px)."""
    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=2)


def _draw(rgb: np.ndarray, masks: Sequence[tuple[np.ndarray | None, tuple[int, int, int]]], fill: float = 0.0):
    """Outline each ``(mask, colour)`` (already at display size) on ``rgb`` in place; ``fill`` tints inside."""
    for mask, colour in masks:
        if mask is None or not mask.any():
            continue
        if fill > 0:
            rgb[mask] = ((1 - fill) * rgb[mask] + fill * np.asarray(colour)).astype(np.uint8)
        rgb[_outline(mask)] = colour
    return rgb


def _data_uri(rgb: np.ndarray, fmt: str = "JPEG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    else:
        img.save(buf, format="PNG", optimize=True)
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _heat(values: np.ndarray, vmax: float) -> np.ndarray:
    """``values / vmax`` through matplotlib's 'magma' colour map: ``(h, w, 3)`` uint8."""
    from matplotlib import colormaps

    rgba = colormaps["magma"](np.clip(values / max(vmax, 1e-12), 0.0, 1.0))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def _montage_slices(pred: np.ndarray, ref: np.ndarray | None, liver: np.ndarray | None) -> list[int]:
    """Up to MONTAGE_SLICES slices: the most tumour (prediction or reference) at least a few slices
    apart, or evenly over the liver (or the volume) when there is none. Sorted."""
    z = pred.shape[0]
    area = np.count_nonzero(pred.reshape(z, -1), axis=1)
    if ref is not None:
        area = np.maximum(area, np.count_nonzero(ref.reshape(z, -1), axis=1))
    if area.any():
        gap = max(1, z // (3 * MONTAGE_SLICES))  # so the montage is not six neighbours of one lesion
        chosen: list[int] = []
        for k in np.argsort(-area, kind="stable"):
            if area[k] == 0 or len(chosen) == MONTAGE_SLICES:
                break
            if all(abs(int(k) - c) >= gap for c in chosen):
                chosen.append(int(k))
        return sorted(chosen)
    span = np.flatnonzero(np.asarray(liver).reshape(z, -1).any(axis=1)) if liver is not None else np.array([])
    lo, hi = (int(span[0]), int(span[-1])) if span.size else (0, z - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, min(MONTAGE_SLICES, hi - lo + 1))})


def _montage(case: CaseReport) -> str:
    image = np.asarray(case.image)
    pred = np.asarray(case.prediction) != 0
    ref = None if case.reference is None else np.asarray(case.reference) != 0
    liver = None if case.liver is None else np.asarray(case.liver) != 0
    size = _display_size(image.shape[1:], case.spacing[1:], MONTAGE_PX)
    columns = ["CT", "prediction"] + (["reference"] if ref is not None else [])
    vmax = 0.0
    if case.uncertainty is not None:
        columns.append(case.uncertainty_label)
        vmax = float(np.max(case.uncertainty)) or 1.0
    rows = []
    for k in _montage_slices(pred, ref, liver):
        gray = _gray(image[k], size)
        p = _resize_mask(pred[k], size)
        shown = _draw(gray.copy(), [(None if liver is None else _resize_mask(liver[k], size), LIVER_RGB)])
        cells = [_data_uri(gray), _data_uri(_draw(shown, [(p, PRED_RGB)], fill=0.3))]
        if ref is not None:
            cells.append(_data_uri(_draw(gray.copy(), [(_resize_mask(ref[k], size), REF_RGB)], fill=0.25)))
        if case.uncertainty is not None:
            from PIL import Image

            u = np.asarray(Image.fromarray(np.asarray(case.uncertainty[k], np.float32), mode="F").resize(
                size[::-1], Image.BILINEAR))
            heat = _heat(u, vmax)
            alpha = np.clip(u / vmax, 0.0, 1.0)[..., None] ** 0.5  # faint where certain: the CT shows through
            cells.append(_data_uri((gray * (1 - alpha) + heat * alpha).astype(np.uint8)))
        imgs = "".join(
            f'<td><img src="{uri}" width="{size[1]}" height="{size[0]}" alt="slice {k} {_e(col)}"></td>'
            for uri, col in zip(cells, columns)
        )
        z_mm = k * float(case.spacing[0])
        rows.append(f'<tr><td class="note">slice {k}<br>z {z_mm:.1f} mm<br>'
                    f'predicted<br>{int(pred[k].sum())} px</td>{imgs}</tr>')
    head = "<tr><td></td>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>"
    caption = (
        f"Slices with the most tumour (prediction or reference). Window {DISPLAY_WINDOW_HU[0]:g} to "
        f"{DISPLAY_WINDOW_HU[1]:g} HU. Radiological view: the patient's right on the image's left, anterior at the "
        "top."
    )
    if case.uncertainty is not None:
        caption += f" {case.uncertainty_label}: magma colour map from 0 (transparent) to {vmax:.3g} (bright)."
    return f'<table class="montage">{head}{"".join(rows)}</table><p class="note">{_e(caption)}</p>'


def _browser(case: CaseReport) -> str:
    image = np.asarray(case.image)
    pred = np.asarray(case.prediction) != 0
    ref = None if case.reference is None else np.asarray(case.reference) != 0
    liver = None if case.liver is None else np.asarray(case.liver) != 0
    z = image.shape[0]
    size = _display_size(image.shape[1:], case.spacing[1:], BROWSER_PX)
    frames = []
    for k in range(z):
        overlays = [(None if liver is None else _resize_mask(liver[k], size), LIVER_RGB)]
        if ref is not None:
            overlays.append((_resize_mask(ref[k], size), REF_RGB))
        overlays.append((_resize_mask(pred[k], size), PRED_RGB))
        frames.append(_data_uri(_draw(_gray(image[k], size), overlays)))
    pred_px = np.count_nonzero(pred.reshape(z, -1), axis=1)
    ref_px = None if ref is None else np.count_nonzero(ref.reshape(z, -1), axis=1)
    start = int(np.argmax(pred_px)) if pred_px.any() else (
        int(np.argmax(ref_px)) if ref_px is not None and ref_px.any() else z // 2)
    meta = {"z_mm": [round(k * float(case.spacing[0]), 2) for k in range(z)], "pred": pred_px.tolist(),
            "ref": None if ref_px is None else ref_px.tolist(), "start": start}
    # The strip: one column per slice; top half red where predicted, bottom half green where in the reference.
    rects = [f'<rect x="{k}" y="0" width="1" height="1" fill="rgb{PRED_RGB}"/>' for k in np.flatnonzero(pred_px)]
    if ref_px is not None:
        rects += [f'<rect x="{k}" y="1" width="1" height="1" fill="rgb{REF_RGB}"/>' for k in np.flatnonzero(ref_px)]
    strip = (f'<svg id="slice-strip" viewBox="0 0 {z} 2" preserveAspectRatio="none" '
             f'xmlns="http://www.w3.org/2000/svg"><rect x="0" y="0" width="{z}" height="2" fill="#eee"/>'
             f'{"".join(rects)}</svg>')
    and_ref = " and reference (bottom, green)" if ref is not None else ""
    legend = [f'<span><span class="swatch" style="background:rgb{PRED_RGB}"></span>prediction</span>']
    if ref is not None:
        legend.append(f'<span><span class="swatch" style="background:rgb{REF_RGB}"></span>reference</span>')
    if liver is not None:
        legend.append(f'<span><span class="swatch" style="background:rgb{LIVER_RGB}"></span>predicted liver</span>')
    return (
        '<div id="browser">'
        f'<img id="browser-img" src="{frames[start]}" width="{size[1]}" height="{size[0]}" alt="axial slice">'
        '<div id="browser-controls">'
        f'<input id="slice-slider" type="range" min="0" max="{z - 1}" step="1" value="{start}" '
        'aria-label="axial slice">'
        f'<div id="slice-label">slice {start}</div>{strip}'
        f'<p class="note">Strip: slices with predicted tumour (top, red){and_ref}'
        '; click to jump. Slice 0 is the most inferior. Arrow keys move the slider when it has focus; '
        'add <code>#slice=K</code> to the address to open at slice K.</p>'
        f'<p class="legend">{"".join(legend)}</p></div></div>'
        f'<script type="application/json" id="browser-frames">{_json(frames)}</script>'
        f'<script type="application/json" id="browser-meta">{_json(meta)}</script>'
        f"<script>{_BROWSER_JS}</script>"
    )


def _lesion_components(
    pred: np.ndarray, lesions: Sequence[Mapping[str, Any]]
) -> tuple[dict[int, tuple[int, tuple[slice, ...]]], np.ndarray]:
    """``({lesion id: (component label, its bounding box)}, component labels)``.

    Numbered as :func:`hepaseg.inference.lesions.lesion_table` does (26-connected components,
    largest first, ties in raster order of their first voxel); a row whose voxel count does not
    match its component (another connectivity) gets none.
    """
    labels, n = ndimage.label(pred, structure=ndimage.generate_binary_structure(3, 3))
    if n == 0:
        return {}, labels
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-counts, kind="stable") + 1  # lesion id i <-> component order[i - 1]
    boxes = ndimage.find_objects(labels)
    out = {}
    for row in lesions[:MAX_THUMBNAILS]:
        i = int(row.get("id", 0))
        if 1 <= i <= n and int(counts[order[i - 1] - 1]) == int(row.get("voxels", -1)):
            lab = int(order[i - 1])
            out[i] = (lab, boxes[lab - 1])
    return out, labels


def _window(centre: float, half: float, n: int) -> tuple[int, int]:
    """``[start, stop)`` of about ``2 half + 1`` pixels around ``centre``, shifted (not cut) to fit in ``n``."""
    length = min(n, int(math.ceil(2 * half)) + 1)
    start = int(round(centre - (length - 1) / 2))
    start = min(max(0, start), n - length)
    return start, start + length


def _thumbnails(case: CaseReport) -> dict[int, str]:
    """``{lesion id: data URI}``: the lesion's slice of largest diameter around its in-plane box."""
    pred = np.asarray(case.prediction) != 0
    if not case.lesions or not pred.any():
        return {}
    boxes, labels = _lesion_components(pred, case.lesions)
    image = np.asarray(case.image)
    ref = None if case.reference is None else np.asarray(case.reference) != 0
    sy, sx = float(case.spacing[1]), float(case.spacing[2])
    out = {}
    for row in case.lesions:
        i = int(row.get("id", 0))
        if i not in boxes:
            continue
        lab, box = boxes[i]
        k = int(row.get("diameter_slice", box[0].start))
        if not box[0].start <= k < box[0].stop:
            k = box[0].start
        # A square field of view (mm) around the lesion: its extent + 50 %, at least 30 mm.
        cy, cx = (box[1].start + box[1].stop - 1) / 2, (box[2].start + box[2].stop - 1) / 2
        half_mm = max(15.0, 0.75 * max((box[1].stop - box[1].start) * sy, (box[2].stop - box[2].start) * sx))
        y0, y1 = _window(cy, half_mm / sy, image.shape[1])
        x0, x1 = _window(cx, half_mm / sx, image.shape[2])
        size = _display_size((y1 - y0, x1 - x0), (sy, sx), THUMB_PX)
        rgb = _gray(image[k, y0:y1, x0:x1], size)
        overlays = []
        if ref is not None:
            overlays.append((_resize_mask(ref[k, y0:y1, x0:x1], size), REF_RGB))
        overlays.append((_resize_mask(pred[k, y0:y1, x0:x1] & (labels[k, y0:y1, x0:x1] != lab), size), (255, 150, 150)))
        overlays.append((_resize_mask(labels[k, y0:y1, x0:x1] == lab, size), PRED_RGB))
        out[i] = _data_uri(_draw(rgb, overlays))
    return out


# --- page ----------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _json(value: object) -> str:
    """JSON safe inside <script>: no "</script>" or "<!--" can appear."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _number(value: object, scale: float = 1.0, decimals: int = 2) -> str:
    if value is None:
        return "–"
    try:
        x = float(value) * scale  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return _e(value)
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:,.0f}" if decimals == 0 else f"{x:.{decimals}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1, cls: str = "") -> str:
    """Cells must be escaped by the caller; the header is escaped here."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metrics(metrics: Mapping[str, Any]) -> str:
    sections = [("tumour", metrics.get("tumor", metrics))]
    if isinstance(metrics.get("liver"), Mapping):
        sections.append(("liver", metrics["liver"]))
    header = ["Metric", *(name for name, _ in sections)]
    rows = []
    for key, name, scale, unit, decimals in _METRIC_ROWS:
        if any(key in m for _, m in sections):
            rows.append([_e(name)] + [
                (_number(m[key], scale, decimals) + _e(unit)) if key in m else "–" for _, m in sections])
    return _table(header, rows)


def _lesion_table(case: CaseReport) -> str:
    if not case.lesions:
        return '<p class="note">No lesion predicted.</p>'
    thumbs = _thumbnails(case)
    header = ["Lesion", "View", "Volume (mL)", "Max axial diameter (mm)", "Slices", "Centroid z, y, x (mm)"]
    extra = [k for k in ("mean_probability", "max_probability", "mean_uncertainty", "member_agreement",
                         "distance_to_liver_surface_mm") if any(k in r for r in case.lesions)]
    header += [k.replace("_", " ") for k in extra]
    rows = []
    for row in case.lesions:
        i = int(row.get("id", 0))
        thumb = (f'<img class="thumb" src="{thumbs[i]}" alt="lesion {i}">' if i in thumbs
                 else '<span class="note">–</span>')
        centroid = row.get("centroid_mm") or ()
        rows.append([
            _e(i), thumb, _number(row.get("volume_ml"), decimals=3), _number(row.get("max_axial_diameter_mm"),
                                                                            decimals=1),
            _e(f"{row.get('first_slice', '')}–{row.get('last_slice', '')}"),
            _e(", ".join(_number(v, decimals=1) for v in centroid)),
            *(_number(row.get(k), decimals=3) for k in extra),
        ])
    note = ""
    if len(case.lesions) > MAX_THUMBNAILS:
        note = f'<p class="note">Thumbnails for the {MAX_THUMBNAILS} largest lesions only.</p>'
    legend = (f'<p class="note">Thumbnails: the lesion\'s slice of largest diameter, the lesion outlined in red, other '
              f'predicted tumour in pink{", the reference in green" if case.reference is not None else ""}.</p>')
    return _table(header, rows, numeric_from=2) + note + legend


def _versions(extra: Mapping[str, str]) -> dict[str, str]:
    versions = {"hepaseg": __version__, "python": platform.python_version(), "numpy": np.__version__}
    versions.update({str(k): str(v) for k, v in extra.items()})
    return versions


def render_case_report(case: CaseReport) -> str:
    """The report as one HTML string.

    Raises:
        ValueError: arrays of different shapes, a spacing that is not three positive values,
            or an uncertainty with negative or non-finite values.
    """
    _check(case)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    z, y, x = np.shape(case.image)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>hepaseg report: {_e(case.case_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(case.case_id)}: liver tumour prediction</h1>",
        f'<p class="meta">{z} slices of {y} x {x} pixels · spacing (z, y, x) '
        f'{", ".join(f"{float(s):.3g}" for s in case.spacing)} mm · {len(case.lesions)} lesion(s) predicted · '
        f"hepaseg {_e(__version__)} · {_e(stamp)}</p>",
    ]
    for warning in case.warnings:
        parts.append(f'<div class="warning"><strong>warning:</strong> {_e(warning)}</div>')
    if case.metrics is not None:
        parts += ["<h2>Metrics against the reference</h2>", _metrics(case.metrics)]
    parts += ["<h2>Axial montage</h2>", _montage(case)]
    parts += ['<h2 id="browser-section">Slice browser</h2>', _browser(case)]
    parts += ["<h2>Lesions</h2>", _lesion_table(case)]
    parts.append("<h2>How this was made</h2>")
    if case.command:
        parts.append(f"<pre><code>{_e(case.command)}</code></pre>")
    if case.models:
        keys: list[str] = []
        for m in case.models:
            keys += [k for k in m if k not in keys]
        parts.append(_table([k.replace("_", " ") for k in keys],
                            [[_e(m.get(k, "–")) for k in keys] for m in case.models], numeric_from=len(keys)))
    versions = _versions(case.versions)
    parts.append(_table(["Package", "Version"], [[_e(k), _e(v)] for k, v in versions.items()], numeric_from=2))
    if case.details:
        parts.append(_table(["Case", ""], [[_e(k), _e(v)] for k, v in case.details.items()], numeric_from=2))
    if case.timings:
        parts.append(_table(["Step", "Seconds"], [[_e(k), _number(v, decimals=1)] for k, v in case.timings.items()]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_case_report(case: CaseReport, path: str | os.PathLike) -> Path:
    """Render ``case`` and write it to ``path`` atomically; returns ``Path(path)``."""
    text = render_case_report(case)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# --- from a prediction ---------------------------------------------------------------------------


def _file_facts(path: str | os.PathLike) -> dict[str, str]:
    p = Path(path)
    try:
        digest = hashlib.sha256()
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return {"file": str(p), "size": f"{p.stat().st_size / 1e6:.2f} MB", "sha256": digest.hexdigest()[:16]}
    except OSError as exc:
        return {"file": str(p), "size": "–", "sha256": f"unreadable ({exc.strerror})"}


def predict_report(
    result: Any,
    path: str | os.PathLike,
    *,
    command: str = "",
    checkpoints: Sequence[str | os.PathLike] = (),
    liver_checkpoint: str | os.PathLike | None = None,
    uncertainty: np.ndarray | None = None,
    uncertainty_label: str = "uncertainty",
) -> Path:
    """Write the report of a :func:`hepaseg.inference.predict_case` result to ``path``.

    Args:
        result: the :class:`~hepaseg.inference.pipeline.PredictResult` (with its ``volume``,
            ``tumor`` and, after a cascade, ``liver`` arrays).
        path: the HTML file to write (``OUT/report.html``).
        command: the command line, shown as given.
        checkpoints: the tumour model file(s) (checkpoint or ONNX), listed with size and SHA-256.
        liver_checkpoint: the liver-stage checkpoint of a cascade.
        uncertainty: ``(z, y, x)`` float >= 0 on the case's grid, or None (default: the result's
            ``uncertainty`` attribute when it has one).
        uncertainty_label: what ``uncertainty`` is (the montage column's heading).

    Raises:
        HepasegError: the result carries no arrays (a PredictResult made without them).
    """
    volume = getattr(result, "volume", None)
    tumor = getattr(result, "tumor", None)
    if volume is None or tumor is None:
        raise HepasegError("--report: the prediction result has no image or mask arrays: expected a result of "
                           "predict_case. Re-run `hepaseg predict` with --report")
    if uncertainty is None:
        uncertainty = getattr(result, "uncertainty", None)
    settings = dict(getattr(result, "settings", {}) or {})
    reference = None if volume.label is None else volume.label == 2
    models = []
    files = [str(c) for c in checkpoints if c is not None]
    for i, file in enumerate(files or [None]):
        row = {"role": "tumour" if len(files) <= 1 else f"tumour member {i + 1}",
               "model": settings.get("model", getattr(result, "model_name", "")),
               "engine": settings.get("engine", getattr(result, "engine", "")),
               "options": json.dumps(settings.get("model_options", {}), sort_keys=True)}
        if file is not None:
            row.update(_file_facts(file))
        models.append(row)
    cascade = settings.get("cascade")
    if isinstance(cascade, Mapping):
        row = {"role": "liver", "model": cascade.get("liver_model", ""), "engine": "torch",
               "options": json.dumps(cascade.get("liver_model_options", {}), sort_keys=True)}
        if liver_checkpoint is not None or cascade.get("liver_checkpoint"):
            row.update(_file_facts(liver_checkpoint or cascade["liver_checkpoint"]))
        models.append(row)
    versions: dict[str, str] = {}
    for package in ("torch", "onnxruntime"):
        try:
            module = __import__(package)
        except ImportError:
            continue
        if package == "torch" or settings.get("engine") == "onnx":
            versions[package] = str(getattr(module, "__version__", "?"))
    data_options = settings.get("data_options", {})
    orientation = settings.get("orientation", {})
    details = {
        "source": getattr(volume, "source", "") or "",
        "shape (z, y, x)": " x ".join(str(s) for s in np.shape(volume.image)),
        "spacing (z, y, x) mm": ", ".join(f"{float(s):.4g}" for s in volume.spacing),
        "orientation": orientation.get("canonical", "") if isinstance(orientation, Mapping) else "",
        "source voxel order": orientation.get("axcodes", "") if isinstance(orientation, Mapping) else "",
        "threshold": settings.get("threshold", ""),
        "test-time flips": settings.get("tta", ""),
        "preprocessing": json.dumps(data_options, sort_keys=True) if data_options else "",
    }
    case = CaseReport(
        case_id=getattr(result, "case_id", "") or getattr(volume, "case_id", "case"),
        image=volume.image,
        spacing=tuple(float(s) for s in volume.spacing),
        prediction=np.asarray(tumor),
        reference=reference,
        liver=getattr(result, "liver", None),
        uncertainty=uncertainty,
        uncertainty_label=uncertainty_label,
        lesions=list(getattr(result, "lesions", []) or []),
        metrics=getattr(result, "metrics", None),
        command=command,
        models=models,
        versions=versions,
        details={k: v for k, v in details.items() if v not in ("", None)},
        warnings=list(getattr(result, "warnings", []) or []),
        timings=dict(getattr(result, "timings", {}) or {}),
    )
    return write_case_report(case, path)
