"""``hepaseg explain``: the paper's Fig. 1 for a trained network, on one axial slice.

:func:`explain_slice` runs a checkpoint on one slice of a CT case and draws one PNG::

    row 0       input (windowed, query pixels marked) | ground truth outline | prediction
    one row     channel mean of the block input X | of the block output X^s + X^c |
    per block   spatial attention of query 1 over the input | of query 2 | ...

The rows per block exist only for networks with context aggregation blocks
(MFCNet, :mod:`hepaseg.models.context`); for any other network the figure title,
:attr:`ExplainResult.notes` and the CLI say plainly that those parts do not apply.

Coordinates. Everything is drawn on the network's input grid (``size x size``
pixels, the slice as ``hepaseg prepare`` resized it). Query pixels are given in
ORIGINAL slice pixels ``(y, x)`` (row, column of the CT slice) and mapped to the
input grid by ``y' = min(size - 1, floor((y + 0.5) * size / H))`` (the input pixel
whose area holds the centre of the original pixel; the same convention as the
bilinear, ``align_corners=False`` resize); a block of stride ``s`` then sees the
query at ``(y' // s, x' // s)``.

Default queries (when none are given):

* **tumour**: the centroid of the largest ground-truth tumour lesion in the slice
  (8-connected), moved to the nearest pixel of that lesion so that it lies in
  tumour even for a crescent-shaped one; when the source has no labels or the
  slice has no labelled tumour, the pixel of highest predicted tumour probability.
* **background**: inside the body (HU > -500, holes filled, the largest
  component), the pixel farthest from both the tumour and the body outline,
  i.e. the maximum over the body of ``min(distance to tumour, distance to air)``
  in mm. "Tumour" there is the labelled tumour of the slice, else the predicted
  mask (probability > 0.5), else the tumour query pixel alone. So the point lies
  well inside soft tissue and as far from any tumour as the body allows.

What the maps mean. ``before``/``after`` are the channel means of the block's input
``X`` and output ``X^s + X^c`` (a fresh or untrained block with ``alpha = beta = 0``
returns exactly ``2 X``, so the two maps then differ only by that factor). An
attention map of query ``j`` is row ``j`` of ``M = softmax(Q K^T)`` at the block's
resolution: non-negative, summing to 1 over the map, drawn as a heat map over the
input (each block pixel covers ``stride x stride`` input pixels).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from hepaseg.errors import HepasegError
from hepaseg.inference.predictor import check_volume_for_model
from hepaseg.inference.preprocess import parse_data_options, preprocess_slices, resize_slices
from hepaseg.io import LABEL_TUMOR, DicomOptions, Volume, read_volume
from hepaseg.io.atomic import atomic_path
from hepaseg.io.outputs import check_output_file

__all__ = ["BODY_ABOVE_HU", "ExplainResult", "default_queries", "explain_slice", "map_to_input_grid"]

#: Soft tissue starts above this HU; air (about -1000 HU) and lung are below it.
BODY_ABOVE_HU = -500.0


@dataclass
class ExplainResult:
    """What :func:`explain_slice` drew and where.

    Attributes:
        path: the PNG written.
        model_name: registry name of the checkpoint's network.
        case_id: the volume's id.
        slice_index: the axial slice ``z`` explained.
        queries: query pixels ``(y, x)`` in ORIGINAL slice pixels.
        input_queries: the same on the network's ``size x size`` input grid.
        query_names: one short name per query (``"tumour"``, ``"background"``, ``"q1"``...).
        query_rules: how each query was chosen (one line each).
        stages: encoder levels of the context blocks drawn (empty for other networks).
        blocks: per stage ``{"stage", "stride", "shape": (h, w, C), "alpha", "beta", "block_points"}``.
        arrays: the arrays drawn: ``"input"`` ``(S, S)`` in ``[0, 1]``, ``"probability"``
            ``(S, S)``, ``"ground_truth"`` ``(S, S)`` bool (labelled sources only), and per
            stage ``l``: ``"stage{l}_before"`` / ``"stage{l}_after"`` ``(h, w)`` channel means
            and ``"stage{l}_attention"`` ``(P, h, w)`` (row ``p``: query ``p``; sums to 1).
        notes: plain-language remarks (parts that do not apply, query fallbacks).
    """

    path: Path
    model_name: str
    case_id: str
    slice_index: int
    queries: list[tuple[int, int]]
    input_queries: list[tuple[int, int]]
    query_names: list[str]
    query_rules: list[str]
    stages: list[int] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def map_to_input_grid(point: tuple[int, int], original_hw: tuple[int, int], size: int) -> tuple[int, int]:
    """Original slice pixel ``(y, x)`` -> pixel of the ``size x size`` network input.

    The input pixel whose area contains the centre of the original pixel
    (``align_corners=False`` convention, as the resize in prepare).
    """
    return tuple(  # type: ignore[return-value]
        min(size - 1, math.floor((v + 0.5) * size / n)) for v, n in zip(point, original_hw)
    )


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def default_queries(
    image_hu: np.ndarray,
    probability: np.ndarray,
    tumor: np.ndarray | None,
    spacing_yx: tuple[float, float] = (1.0, 1.0),
) -> tuple[list[tuple[int, int]], list[str]]:
    """The default tumour and background query pixels of one slice (rules in the module docstring).

    Args:
        image_hu: ``(H, W)`` slice in HU.
        probability: ``(H, W)`` predicted tumour probability at the slice's resolution.
        tumor: ``(H, W)`` bool labelled tumour, or ``None`` for an unlabelled source.
        spacing_yx: in-plane pixel size in mm ``(y, x)``.

    Returns:
        ``([tumour (y, x), background (y, x)], [rule of each])`` in original pixels.
    """
    if tumor is not None and tumor.any():
        lesion = _largest_component(tumor)
        cy, cx = ndimage.center_of_mass(lesion)
        ys, xs = np.nonzero(lesion)
        nearest = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        tumour_point = (int(ys[nearest]), int(xs[nearest]))
        tumour_rule = "centroid of the largest labelled tumour in the slice"
        reference = tumor
    else:
        flat = int(np.argmax(probability))
        tumour_point = tuple(int(v) for v in np.unravel_index(flat, probability.shape))
        why = "no labels" if tumor is None else "no labelled tumour in this slice"
        tumour_rule = f"highest predicted tumour probability ({float(probability.flat[flat]):.2f}; {why})"
        reference = probability > 0.5
        if not reference.any():
            reference = np.zeros_like(reference)
            reference[tumour_point] = True

    body = _largest_component(ndimage.binary_fill_holes(image_hu > BODY_ABOVE_HU))
    if not body.any():  # no soft tissue at all: use the whole slice, the border playing the body outline
        body = np.ones_like(reference)
        body[[0, -1], :] = False
        body[:, [0, -1]] = False
    to_tumour = ndimage.distance_transform_edt(~reference, sampling=spacing_yx)
    # Pad with air: the field of view may cut through the body (cropped scans), and a query
    # on the image edge shows the border, not background tissue.
    to_air = ndimage.distance_transform_edt(np.pad(body, 1), sampling=spacing_yx)[1:-1, 1:-1]
    score = np.where(body, np.minimum(to_tumour, to_air), -1.0)
    flat = int(np.argmax(score))
    background_point = tuple(int(v) for v in np.unravel_index(flat, score.shape))
    background_rule = (
        "inside the body, farthest from tumour, air and the image edge "
        f"({float(score.flat[flat]):.0f} mm from the nearer)"
    )
    return [tumour_point, background_point], [tumour_rule, background_rule]  # type: ignore[list-item]


def _read_source(source: str | os.PathLike | Volume, dicom: DicomOptions | None = None) -> Volume:
    if isinstance(source, Volume):
        return source
    try:
        return read_volume(source, with_label=True, dicom=dicom)
    except HepasegError:
        if dicom is not None and dicom.seg:
            raise  # a SEG the user named must be readable
        # an unlabelled source is fine; image errors raise here
        return read_volume(source, with_label=False, dicom=dicom)


def _check_queries(queries: Sequence[Sequence[int]], hw: tuple[int, int]) -> list[tuple[int, int]]:
    points = []
    for q in queries:
        ok = isinstance(q, Sequence) and len(q) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in q
        )
        if not ok or not (0 <= q[0] < hw[0] and 0 <= q[1] < hw[1]):
            raise HepasegError(
                f"--query: {tuple(q) if isinstance(q, Sequence) else q!r} is not a pixel of the "
                f"{hw[0]} x {hw[1]} slice: expected Y,X integers with 0 <= Y < {hw[0]} and 0 <= X < {hw[1]} "
                "(row, column in original slice pixels)"
            )
        points.append((int(q[0]), int(q[1])))
    if not points:
        raise HepasegError("--query: expected at least one Y,X pixel, got none. Omit --query for the defaults")
    return points


def explain_slice(
    checkpoint: str | os.PathLike,
    source: str | os.PathLike | Volume,
    z: int,
    out: str | os.PathLike,
    *,
    queries: Sequence[Sequence[int]] | None = None,
    dicom: DicomOptions | None = None,
) -> ExplainResult:
    """Draw input, ground truth, prediction, context-block features and attention for one slice.

    Args:
        checkpoint: a ``hepaseg train`` checkpoint (any registered network).
        source: a CT case (any format :func:`hepaseg.io.read_volume` reads) or a :class:`Volume`.
        z: axial slice index, ``0 <= z < depth``.
        out: the PNG to write (atomically; parent folders are created).
        queries: query pixels ``(y, x)`` in ORIGINAL slice pixels; default one tumour and
            one background pixel (see the module docstring).
        dicom: series choice and SEG labels of a DICOM source (``--series``, ``--seg``, ``--seg-labels``).

    Returns:
        :class:`ExplainResult` with the arrays drawn.

    Raises:
        HepasegError: unreadable checkpoint or source, ``z`` out of range (naming the slice
            and the volume's depth), a query outside the slice, an ``out`` that is not a writable
            ``.png`` path apart from the inputs.
    """
    out = Path(out)
    # Before any work: a writable .png path, not an input nor inside an input folder.
    check_output_file(out, option="--out", inputs=[checkpoint, None if isinstance(source, Volume) else source],
                      suffix=".png")
    from hepaseg.training import load_checkpoint  # torch + lightning: imported only when used

    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval().to("cpu")  # one slice: the CPU is quick enough and always there
    opts = parse_data_options(loaded.data_options, source=f"{checkpoint}: data options")
    volume = _read_source(source, dicom)
    where = volume.source or volume.case_id
    depth = volume.shape[0]
    if isinstance(z, bool) or not isinstance(z, (int, np.integer)) or not 0 <= z < depth:
        raise HepasegError(
            f"--slice: slice {z!r} is out of range for {where}: expected 0 <= slice < {depth} "
            f"(the volume has {depth} axial slices)"
        )
    z = int(z)
    check_volume_for_model(volume.image, opts, model=model, source=where)

    size, k = opts.size, opts.context_slices
    h, w = volume.shape[1:]
    x = preprocess_slices(volume.image, [z], opts)  # (1, 2K+1, S, S) in [0, 1]
    with torch.inference_mode():
        probability = torch.sigmoid(model(x)[:, 0].float())  # (1, S, S)
    prob_original = resize_slices(probability, (h, w))[0].clamp(0, 1).numpy()  # (H, W)
    tumor = None if volume.label is None else volume.label[z] == LABEL_TUMOR

    if queries is None:
        points, rules = default_queries(volume.image[z], prob_original, tumor, tuple(volume.spacing[1:]))
        names = ["tumour", "background"]
    else:
        points = _check_queries(queries, (h, w))
        names = [f"q{i + 1}" for i in range(len(points))]
        rules = ["given with --query"] * len(points)
    input_points = [map_to_input_grid(p, (h, w), size) for p in points]

    arrays: dict[str, np.ndarray] = {"input": x[0, k].numpy(), "probability": probability[0].numpy()}
    if tumor is not None:
        from hepaseg.data.prepare import resize_label

        arrays["ground_truth"] = resize_label(volume.label[z : z + 1], size=size)[0] == LABEL_TUMOR

    notes: list[str] = []
    if tumor is not None and not tumor.any():
        notes.append(f"slice {z} has no labelled tumour")
    stages: list[int] = []
    blocks: list[dict[str, Any]] = []
    has_blocks = hasattr(model, "capture_context") and len(getattr(model, "context_stages", ())) > 0
    if has_blocks:
        with torch.inference_mode(), model.capture_context(input_points) as records:
            model(x)
        for stage in sorted(records):
            rec = records[stage]
            stages.append(stage)
            c, bh, bw = rec.input.shape[1:]
            arrays[f"stage{stage}_before"] = rec.input[0].float().mean(0).numpy()
            arrays[f"stage{stage}_after"] = rec.output[0].float().mean(0).numpy()
            arrays[f"stage{stage}_attention"] = rec.spatial_rows[0].float().numpy()  # (P, h, w)
            blocks.append(
                {"stage": stage, "stride": rec.stride, "shape": (int(bh), int(bw), int(c)), "alpha": rec.alpha,
                 "beta": rec.beta, "block_points": list(rec.block_points)}
            )
    else:
        notes.insert(
            0,
            f"{loaded.model_name} has no context aggregation block: feature maps before/after and attention "
            "maps do not apply",
        )

    result = ExplainResult(
        path=out, model_name=loaded.model_name, case_id=volume.case_id, slice_index=z, queries=points,
        input_queries=input_points, query_names=names, query_rules=rules, stages=stages, blocks=blocks,
        arrays=arrays, notes=notes,
    )
    _draw(result, window=opts.window, original_hw=(h, w))
    return result


# --- drawing ------------------------------------------------------------------------------------

_QUERY_STYLE = [("o", "#ff3030"), ("s", "#00e5ff"), ("D", "#ffd000"), ("^", "#ff66ff"), ("v", "#7cff4f")]


def _mark(ax, points: Sequence[tuple[int, int]], names: Sequence[str], *, labels: bool, first: int = 0) -> None:
    """Mark query pixels; query ``first + i`` keeps the same marker and colour in every panel."""
    for i, ((y, x), name) in enumerate(zip(points, names), start=first):
        marker, colour = _QUERY_STYLE[i % len(_QUERY_STYLE)]
        ax.plot([x], [y], marker=marker, markersize=8, markerfacecolor="none", markeredgecolor=colour,
                markeredgewidth=2, linestyle="none")
        if labels:
            ax.annotate(name, (x, y), xytext=(6, -6), textcoords="offset points", color=colour, fontsize=8,
                        fontweight="bold")


def _draw(result: ExplainResult, *, window: tuple[float, float], original_hw: tuple[int, int]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    arrays = result.arrays
    image = arrays["input"]
    size = image.shape[0]
    n_queries = len(result.input_queries)
    ncols = max(3, 2 + n_queries)
    nrows = 1 + len(result.stages)
    fig = Figure(figsize=(3.2 * ncols, 3.3 * nrows + 0.9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    gray = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, "interpolation": "nearest"}

    # Row 0: input with the queries, ground truth, prediction.
    ax = axes[0, 0]
    ax.imshow(image, **gray)
    _mark(ax, result.input_queries, result.query_names, labels=True)
    ax.set_title(f"input z={result.slice_index} ({window[0]:g}..{window[1]:g} HU)\n"
                 f"{original_hw[0]} x {original_hw[1]} -> {size} x {size}", fontsize=9)
    ax = axes[0, 1]
    ax.imshow(image, **gray)
    if "ground_truth" in arrays and arrays["ground_truth"].any():
        ax.contour(arrays["ground_truth"].astype(float), levels=[0.5], colors=["#39ff14"], linewidths=1.2)
        ax.set_title("ground truth tumour (outline)", fontsize=9)
    elif "ground_truth" in arrays:
        ax.set_title("ground truth: no tumour in this slice", fontsize=9)
    else:
        ax.set_title("ground truth: source has no labels", fontsize=9)
    ax = axes[0, 2]
    ax.imshow(image, **gray)
    prob = arrays["probability"]
    heat = ax.imshow(np.ma.masked_less(prob, 0.02), cmap="magma", vmin=0.0, vmax=1.0, alpha=0.6,
                     interpolation="nearest")
    if prob.max() > 0.5 > prob.min():
        ax.contour(prob, levels=[0.5], colors=["#ff3030"], linewidths=1.2)
    ax.set_title(f"prediction: probability, outline at 0.5\n(max {prob.max():.2f})", fontsize=9)
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
    for ax in axes[0, 3:]:
        ax.set_axis_off()

    # One row per context block: channel means before/after, attention of each query.
    for row, block in enumerate(result.blocks, start=1):
        stage, stride = block["stage"], block["stride"]
        bh, bw, c = block["shape"]
        before, after = arrays[f"stage{stage}_before"], arrays[f"stage{stage}_after"]
        ax = axes[row, 0]
        ax.imshow(before, cmap="viridis", interpolation="nearest")
        ax.set_title("before: channel mean of X", fontsize=9)
        ax.set_ylabel(f"stage {stage}: {bh} x {bw} x {c}\n(1/{stride} resolution)", fontsize=10)
        ax = axes[row, 1]
        ax.imshow(after, cmap="viridis", interpolation="nearest")
        ax.set_title(f"after: X^s + X^c\n(alpha={block['alpha']:.3g}, beta={block['beta']:.3g})", fontsize=9)
        attention = arrays[f"stage{stage}_attention"]
        # Block pixel (i, j) covers input pixels [i*stride, (i+1)*stride); padding may extend past the input.
        extent = (-0.5, bw * stride - 0.5, bh * stride - 0.5, -0.5)
        for p in range(n_queries):
            ax = axes[row, 2 + p]
            ax.imshow(image, **gray)
            ax.imshow(attention[p], cmap="jet", alpha=0.55, extent=extent, vmin=0.0,
                      vmax=float(attention[p].max()) or 1.0, interpolation="nearest")
            ax.set_xlim(-0.5, size - 0.5)
            ax.set_ylim(size - 0.5, -0.5)
            _mark(ax, [result.input_queries[p]], [result.query_names[p]], labels=False, first=p)
            by, bx = block["block_points"][p]
            ax.set_title(f"attention of {result.query_names[p]} (block px {by},{bx})\n"
                         f"max {attention[p].max():.3g}, sum {attention[p].sum():.3f}", fontsize=9)
        for ax in axes[row, 2 + n_queries:]:
            ax.set_axis_off()

    title = f"{result.model_name}: {result.case_id}, slice {result.slice_index}"
    if result.notes:
        title += "\n" + "\n".join(result.notes)
    fig.suptitle(title, fontsize=11)
    queries = "; ".join(
        f"{n} = ({y}, {x}) original -> ({iy}, {ix}) input: {r}"
        for n, (y, x), (iy, ix), r in zip(result.query_names, result.queries, result.input_queries,
                                            result.query_rules)
    )
    fig.text(0.5, 0.005, "queries: " + queries, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    with atomic_path(result.path) as tmp:
        fig.savefig(tmp, format="png")
