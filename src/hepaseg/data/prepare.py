"""Turn CT volumes into a prepared 2D slice dataset (``hepaseg prepare``).

Every network in hepaseg trains on axial slices. This module reads each case
(through :func:`hepaseg.io.find_cases` and :func:`hepaseg.io.read_volume`),
windows and resizes it, keeps the slices the protocol asks for, assigns each
PATIENT to train/val/test and writes one compressed shard per case plus a
manifest. Training, evaluation and inference read exactly the format below.

Prepared dataset format (``hepaseg-slices/1``)
----------------------------------------------
::

    DIR/.hepaseg-output.json  marker: written by `hepaseg prepare` (only such a DIR is replaced)
    DIR/manifest.json   written LAST, atomically: its presence means the dataset is complete
    {
      "format": "hepaseg-slices/1", "hepaseg_version": "0.1.0",
      "n_slices": <total slices written>,
      "options": {"window": [lo, hi], "size": 224, "slices": "tumor" | "liver" | "all",
                  "context_slices": K, "split": [0.7, 0.1, 0.2] or null,
                  "split_file": path or null, "seed": S, "z_split": null or {...},
                  "target": "liver"            (only with --target liver; absent = "tumor"),
                  "roi": "liver", "roi_margin_mm": 10.0   (only with --roi liver; absent = whole slices),
                  "val_fraction": 0.15, "val_gap": 2K+2   (only with --val-fraction; see below)},
      "demo_z_split": false,          # true when z_split was used: NOT a patient-level split
      "orientation": "LPS: ...",      # every case is sliced in this one canonical orientation
      "cases": [ {"id": "ircadb-1.1", "source": "...", "kind": "ircadb",
                  "shape": [z, y, x], "spacing": [z, y, x] (mm),
                  "kept_slices": [original z indices], "n_slices": n,
                  "tumor_pixels": <label == 2 pixels at the prepared size>,
                  "liver_pixels": <label > 0 pixels (liver incl. tumour) at the prepared size>,
                  "has_label": true (false: unlabelled source, --slices all; label is all 0),
                  "crop_box": null, or with --roi liver [y0, y1, x0, x1] (see below),
                  "source_axcodes": "LPS", "reoriented": false, "oblique_deg": 0.0,
                  "split": "train" | "val" | "test", "shard": "cases/ircadb-1.1.npz"} ]
    }
    DIR/cases/<id>.npz  (what numpy.savez_compressed writes; deflate level 1, fixed timestamps):
        image        float16 (n, 2K+1, size, size) in [0, 1]; centre slice in channel K
        label        uint8   (n, size, size) in {0 background, 1 liver, 2 tumour}
        slice_index  int32   (n,) original z index of each slice (= kept_slices)

Characters other than ``A-Z a-z 0-9 . _ -`` in a case id become ``_`` in its
shard file name (``lits-117-z:train`` -> ``cases/lits-117-z_train.npz``);
always open the shard named in the manifest.

Preprocessing (inference must do the same; use :func:`preprocess_image`,
:func:`resize_label` and :func:`stack_context`)
----------------------------------------------------------------------------
1. Window: clip HU to ``[lo, hi]`` (default ``[-200, 250]``, the usual liver
   window) and scale linearly to ``[0, 1]``.
2. Resize each axial slice to ``size x size`` pixels (default 224: our choice;
   the MFCNet slides do not state an input size) with :func:`torch.nn.functional.interpolate`, ``align_corners=False``:
   images ``bilinear`` without antialiasing (the same as OpenCV's default
   ``cv2.resize`` used by most LiTS pipelines, and what
   :mod:`hepaseg.inference.preprocess` does), labels ``nearest-exact`` (the
   pixel whose centre is nearest; plain ``nearest`` in torch is shifted by half
   a pixel). Non-square slices are stretched.
3. Slice selection on the ORIGINAL-resolution label: ``tumor`` (default: every
   axial slice whose label contains tumour, the kind of slice the MFCNet slides
   count), ``liver`` (any label
   > 0) or ``all`` (every slice; the only choice for unlabelled volumes).
4. Context: ``context_slices = K`` stores the K neighbours on each side as
   channels (``2K + 1`` channels, slice ``z + j - K`` in channel ``j``); at the
   volume's ends the border slice is repeated.

Targets and the liver ROI (the liver-first cascade, :mod:`hepaseg.inference.cascade`)
----------------------------------------------------------------------------------
``target="liver"`` (``--target liver``) prepares data for a LIVER stage: the
manifest records ``target: "liver"``, training turns ``label > 0`` into the mask,
and ``slices`` defaults to ``all`` (slices with and without liver, so the
network learns where the liver is not). ``target="tumor"`` (default) keeps
``slices="tumor"``, the paper's protocol.

``roi="liver"`` (``--roi liver --roi-margin MM``, tumour target only) crops every
kept slice of a case, BEFORE step 2, to one square box per volume around the
labelled liver (label > 0) grown by ``roi_margin_mm`` (default 10 mm): see
:func:`hepaseg.data.roi.liver_crop_box` for the exact rule, which the cascade
applies to the predicted liver at inference. The case records that box as
``crop_box: [y0, y1, x0, x1]`` (half-open, original pixel coordinates; square;
outside the image only when the box is larger than the image, where the crop
reads -1024 HU and label 0). A crop of side ``s`` is resized ``s -> size``, so a
``size x size`` prediction maps back to the box by a resize ``size -> s``.
Labelled cases without liver keep no slices (``crop_box: null``).

Splits are by PATIENT, never by slice
-------------------------------------
``split=(train, val, test)`` fractions: case ids are sorted, shuffled with
``numpy.random.default_rng(seed)`` and cut in that order. Rounding:
``n_test = floor(n * test + 0.5)``, ``n_val = floor(n * val + 0.5)``, the rest is
train; if that leaves no train case, test and then val give cases back until
train has one (so 1 case -> train only; 3 cases with the default -> 2/0/1;
10 -> 7/1/2). ``split_file``: JSON ``{"train": [ids], "val": [...], "test": [...]}``
naming every case exactly once.

``val_fraction`` (``--val-fraction F``): validation WITHOUT giving up a patient. Every
TRAINING patient's kept slices are cut along z by the rule ``hepaseg crossval`` uses for its
folds (:mod:`hepaseg.data.zval`): the last ``F`` of them (at least one) become the case
``<id>-z:val`` (split ``val``), the slices more than ``2K + 2`` z positions below that block
``<id>-z:train``; each entry records ``patient: <id>``. The patient-level ``val`` fraction
must then be 0 (``--split 0.8,0,0.2``, or ``--split 1,0,0`` to train on every patient) and a
split file must list no ``val`` case. Validation scores on such a set are optimistic (slices
of the training patients), so ``hepaseg evaluate`` and ``compare`` say so in their tables.

``z_split`` (demos only, a single-volume source): the volume's z range is cut
into three contiguous blocks (train lowest z, then val, then test) of the
given fractions, separated by ``gap`` unused slices (default ``2K + 2``, so no
context channel of one block shows a slice of another), giving three case
entries ``<id>-z:train`` etc. Slices of ONE patient are strongly correlated, so
scores on such a split are optimistic; the manifest says ``"demo_z_split": true``.

The paper's LiTS tumour slices
------------------------------
The MFCNet slides use 7190 tumour-bearing axial slices of LiTS. That is the number
of tumour slices used, not the size of the training set: the slides do not say how
the slices were split into training and test sets, nor at which size the network saw
them. Every tumour-bearing slice of the 131 LiTS training volumes
(``volume-N.nii`` + ``segmentation-N.nii``), at our default 224 x 224, is::

    hepaseg prepare /path/to/LiTS --slices tumor --size 224 --out lits_prepared

split by patient with ``--split`` (our protocol); the count depends on the LiTS
release (label corrections changed a few slices).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import sys
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import resource  # Unix: peak memory of the workers
except ImportError:  # pragma: no cover - Windows
    resource = None
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hepaseg import __version__
from hepaseg.data.roi import ROI_MODES, crop_slices, liver_crop_box
from hepaseg.data.zval import check_val_fraction, split_case_along_z, val_note, z_val_gap
from hepaseg.errors import HepasegError
from hepaseg.io import CANONICAL_DESCRIPTION, DicomOptions, find_cases, read_volume
from hepaseg.io.atomic import atomic_dir, write_json_atomic
from hepaseg.io.outputs import check_output_dir, write_output_marker
from hepaseg.io.volume import LABEL_TUMOR, Volume

__all__ = [
    "FORMAT",
    "PREPARE_TARGETS",
    "SLICE_MODES",
    "SPLITS",
    "is_prepared_dir",
    "prepare",
    "preprocess_image",
    "read_manifest",
    "resize_label",
    "select_slices",
    "split_cases",
    "stack_context",
    "summary_table",
]

FORMAT = "hepaseg-slices/1"
SPLITS = ("train", "val", "test")
SLICE_MODES = ("tumor", "liver", "all")
PREPARE_TARGETS = ("tumor", "liver")  # the same as hepaseg.data.dataset.TARGETS (which imports this module)
_CHUNK = 32  # slices resized at once: bounds memory for 512 x 512 x 900 volumes


# --- preprocessing (shared with inference) ------------------------------------------------------


def preprocess_image(
    image_hu: np.ndarray,
    *,
    window: tuple[float, float],
    size: int,
    indices: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Window HU to [0, 1] and resize axial slices to ``size x size``.

    Args:
        image_hu: ``(z, y, x)`` CT in HU.
        window: ``(lo, hi)`` HU, ``lo < hi``.
        size: output slice size in pixels.
        indices: z indices to process (default: all); gathered chunk by chunk so
            a 512 x 512 x 900 volume is never copied whole.

    Returns:
        float32 ``(len(indices), size, size)`` in [0, 1] (bilinear,
        ``align_corners=False``, no antialiasing).
    """
    lo, hi = float(window[0]), float(window[1])
    idx = np.arange(image_hu.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
    out = np.empty((idx.size, size, size), dtype=np.float32)
    for start in range(0, idx.size, _CHUNK):
        chunk = np.asarray(image_hu[idx[start : start + _CHUNK]], dtype=np.float32)
        chunk = (np.clip(chunk, lo, hi) - lo) / (hi - lo)
        t = torch.from_numpy(np.ascontiguousarray(chunk))[:, None]  # (n, 1, y, x)
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        out[start : start + len(chunk)] = t[:, 0].clamp_(0.0, 1.0).numpy()
    return out


def resize_label(label: np.ndarray, *, size: int) -> np.ndarray:
    """Resize a ``(z, y, x)`` label map to uint8 ``(z, size, size)`` with ``nearest-exact``."""
    out = np.empty((label.shape[0], size, size), dtype=np.uint8)
    for start in range(0, label.shape[0], _CHUNK):
        chunk = np.asarray(label[start : start + _CHUNK])
        t = torch.from_numpy(chunk.astype(np.float32))[:, None]
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="nearest-exact")
        out[start : start + len(chunk)] = t[:, 0].round().numpy().astype(np.uint8)
    return out


def stack_context(slices: np.ndarray, indices: Sequence[int], context_slices: int) -> np.ndarray:
    """Gather ``2K + 1`` neighbouring slices as channels around each index.

    Args:
        slices: ``(z, H, W)`` preprocessed volume.
        indices: z indices of the centre slices.
        context_slices: ``K >= 0``; neighbours beyond the volume repeat the border slice.

    Returns:
        ``(len(indices), 2K + 1, H, W)`` with slice ``z + j - K`` in channel ``j``.
    """
    idx = np.asarray(indices, dtype=np.int64)
    offsets = np.arange(-context_slices, context_slices + 1)
    gather = np.clip(idx[:, None] + offsets[None, :], 0, slices.shape[0] - 1)  # (n, 2K+1)
    return slices[gather]


def select_slices(label: np.ndarray | None, mode: str, *, where: str = "volume") -> np.ndarray:
    """Original z indices to keep: ``tumor`` (label == 2 present), ``liver`` (label > 0) or ``all``."""
    if mode == "all":
        return np.arange(label.shape[0] if label is not None else 0, dtype=np.int64)
    if label is None:
        raise HepasegError(
            f"{where}: has no label map but --slices {mode} needs one: expected a labelled case, "
            "got an image only. Use --slices all for unlabelled volumes."
        )
    hit = label == LABEL_TUMOR if mode == "tumor" else label > 0
    return np.flatnonzero(hit.any(axis=(1, 2)))


# --- splits -------------------------------------------------------------------------------------


def split_cases(case_ids: Sequence[str], fractions: Sequence[float], *, seed: int = 0) -> dict[str, str]:
    """Assign case ids to train/val/test by patient (seeded shuffle of the sorted ids).

    Rounding: ``n_test = floor(n * f_test + 0.5)``, ``n_val = floor(n * f_val + 0.5)``,
    train takes the rest; if train would be empty, test and then val give cases
    back so that train always has at least one case.

    Returns:
        ``{case_id: "train" | "val" | "test"}``.
    """
    ids = sorted(case_ids)
    n = len(ids)
    _, f_val, f_test = (float(f) for f in fractions)
    n_test = math.floor(n * f_test + 0.5)
    n_val = math.floor(n * f_val + 0.5)
    while n - n_val - n_test < 1 and (n_test or n_val):
        if n_test:
            n_test -= 1
        else:
            n_val -= 1
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    n_train = n - n_val - n_test
    out = {cid: "train" for cid in shuffled[:n_train]}
    out.update({cid: "val" for cid in shuffled[n_train : n_train + n_val]})
    out.update({cid: "test" for cid in shuffled[n_train + n_val :]})
    return out


def _read_split_file(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HepasegError(f"{path}: split file not found. Give an existing JSON file to --split-file.") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise HepasegError(
            f'{path}: split file is not valid JSON ({exc}). Expected {{"train": [ids], "val": [...], "test": [...]}}.'
        ) from None
    if not isinstance(data, dict) or not set(data) <= set(SPLITS):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise HepasegError(f"{path}: split file keys: expected a subset of {list(SPLITS)}, got {got}.")
    assignment: dict[str, str] = {}
    for split_name, ids in data.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise HepasegError(f"{path}: split {split_name!r}: expected a list of case id strings, got {ids!r}.")
        for cid in ids:
            if cid in assignment:
                raise HepasegError(
                    f"{path}: case {cid!r} is listed in both {assignment[cid]!r} and {split_name!r}: "
                    "expected each case in exactly one split."
                )
            assignment[cid] = split_name
    return assignment


# --- manifest helpers ---------------------------------------------------------------------------


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``root/manifest.json``; raise HepasegError when missing or not ours."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise HepasegError(
            f"{path}: manifest not found: expected a directory written by `hepaseg prepare`. "
            "Run `hepaseg prepare SOURCES --out DIR` first (an interrupted prepare leaves no manifest)."
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HepasegError(f"{path}: manifest is not valid JSON ({exc}). Re-run `hepaseg prepare`.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise HepasegError(f"{path}: manifest format: expected {FORMAT!r}, got {got!r}. Re-run `hepaseg prepare`.")
    for key in ("options", "cases"):
        if key not in manifest:
            raise HepasegError(f"{path}: manifest has no {key!r} entry. Re-run `hepaseg prepare`.")
    return manifest


def is_prepared_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a complete prepare output (a manifest of our format)."""
    try:
        read_manifest(path)
    except HepasegError:
        return False
    return True


def summary_table(manifest: dict[str, Any], *, title: str = "prepared slices") -> Table:
    """A rich table: one row per case (id, slices kept, tumour pixels, split) and a total row."""
    table = Table(title=title)
    table.add_column("case")
    table.add_column("slices kept", justify="right")
    table.add_column("tumour pixels", justify="right")
    table.add_column("split")
    per_split = {s: 0 for s in SPLITS}
    for case in manifest["cases"]:
        table.add_row(case["id"], str(case["n_slices"]), f"{case['tumor_pixels']:,}", case["split"])
        per_split[case["split"]] += case["n_slices"]
    total_px = sum(c["tumor_pixels"] for c in manifest["cases"])
    parts = ", ".join(f"{s} {n}" for s, n in per_split.items())
    table.add_section()
    n_cases = len(manifest["cases"])
    table.add_row(
        f"total ({n_cases} case{'s' if n_cases != 1 else ''})",
        str(manifest["n_slices"]),
        f"{total_px:,}",
        parts,
    )
    note = val_note(manifest)
    if note is not None:
        table.caption = note
    return table


# --- prepare ------------------------------------------------------------------------------------


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id)


def _check_options(window, size, slices, context_slices, split, z_split, split_file) -> tuple:
    try:
        lo, hi = (float(w) for w in window)
    except (TypeError, ValueError):
        raise HepasegError(f"--window: expected two HU numbers LO,HI, got {window!r}.") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise HepasegError(f"--window: expected LO < HI (HU), got {lo:g},{hi:g}. Example: --window -200,250.")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise HepasegError(f"--size: expected a positive number of pixels, got {size!r}. Example: --size 224.")
    if slices not in SLICE_MODES:
        raise HepasegError(f"--slices: expected one of {', '.join(SLICE_MODES)}, got {slices!r}.")
    if not isinstance(context_slices, int) or context_slices < 0:
        raise HepasegError(f"--context-slices: expected an integer >= 0, got {context_slices!r}.")
    fractions = None
    if split is not None and split_file is None and z_split is None:
        fractions = _check_fractions(split, "--split")
    if split_file is not None and z_split is not None:
        raise HepasegError("--split-file and --z-split: expected at most one of them, got both.")
    z_opts = None
    if z_split is not None:
        if isinstance(z_split, dict):
            z_fr = z_split.get("fractions")
            gap = z_split.get("gap")
        else:
            z_fr, gap = z_split, None
        z_fractions = _check_fractions(z_fr, "--z-split")
        if gap is None:
            gap = 2 * context_slices + 2
        if not isinstance(gap, int) or gap < 2 * context_slices:
            raise HepasegError(
                f"--z-gap: expected an integer >= 2 * context_slices = {2 * context_slices} "
                f"(so no context slice is shared between blocks), got {gap!r}."
            )
        z_opts = {
            "fractions": z_fractions,
            "gap": gap,
            "note": "demo only: contiguous z blocks of one patient, not a patient-level split",
        }
    return (lo, hi), fractions, z_opts


def _check_val_fraction_split(val_fraction, fractions, z_opts) -> float:
    """``--val-fraction`` as a float; refused with --z-split or with a patient-level val fraction."""
    value = check_val_fraction(val_fraction)
    if z_opts is not None:
        raise HepasegError("--val-fraction and --z-split: expected at most one of them, got both. --z-split "
                           "already cuts its one volume into train/val/test blocks")
    if fractions is not None and fractions[1] > 0:
        raise HepasegError(
            f"--val-fraction {value:g} with --split VAL {fractions[1]:g}: expected VAL = 0 (the validation set "
            "is the last z-block of each training patient, not val patients). Use e.g. --split 1,0,0 or "
            "--split 0.8,0,0.2"
        )
    return value


def _split_training_patients(root: Path, cases: list[dict[str, Any]], val_fraction: float,
                             gap: int) -> list[dict[str, Any]]:
    """Replace each ``train`` case by its ``-z:train`` / ``-z:val`` blocks (shards rewritten in ``root``)."""
    out: list[dict[str, Any]] = []
    for case in cases:
        if case["split"] != "train":
            out.append(case)
            continue
        out += split_case_along_z(root, case, root, val_fraction=val_fraction, gap=gap)
        (root / case["shard"]).unlink()  # replaced by the two blocks
    return out


def _check_fractions(values, option: str) -> list[float]:
    try:
        fr = [float(v) for v in values]
    except (TypeError, ValueError):
        raise HepasegError(f"{option}: expected three fractions TRAIN,VAL,TEST, got {values!r}.") from None
    if len(fr) != 3 or any(not math.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
        raise HepasegError(
            f"{option}: expected three non-negative fractions TRAIN,VAL,TEST summing to 1 with TRAIN > 0, "
            f"got {values!r}. Example: {option} 0.7,0.1,0.2."
        )
    return fr


def _z_blocks(n_z: int, fractions: Sequence[float], gap: int, where: str) -> dict[str, np.ndarray]:
    """Contiguous z ranges (train, val, test) with ``gap`` unused slices between used blocks."""
    n_used_blocks = sum(1 for f in fractions if f > 0)
    usable = n_z - gap * (n_used_blocks - 1)
    if usable < n_used_blocks:
        raise HepasegError(
            f"{where}: --z-split needs at least {n_used_blocks + gap * (n_used_blocks - 1)} slices "
            f"(blocks + gaps of {gap}), got {n_z}. Use fewer --context-slices or a smaller --z-gap."
        )
    n_test = math.floor(usable * fractions[2] + 0.5) if fractions[2] > 0 else 0
    n_val = math.floor(usable * fractions[1] + 0.5) if fractions[1] > 0 else 0
    n_test, n_val = max(n_test, 1 if fractions[2] > 0 else 0), max(n_val, 1 if fractions[1] > 0 else 0)
    n_train = usable - n_val - n_test
    if n_train < 1:
        raise HepasegError(f"{where}: --z-split leaves no train slices ({n_z} slices). Give train a larger fraction.")
    blocks, start = {}, 0
    for name, n in zip(SPLITS, (n_train, n_val, n_test)):
        if n == 0:
            blocks[name] = np.arange(0)
            continue
        blocks[name] = np.arange(start, start + n)
        start += n + gap
    return blocks


def _process_volume(
    vol: Volume, keep: np.ndarray, *, window, size: int, context_slices: int, box: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess only the slices needed for ``keep`` (and their context): image (n, 2K+1, S, S), label (n, S, S).

    With ``box`` (``roi="liver"``), every slice is first cropped to it (:func:`crop_slices`).
    """
    n_z = vol.image.shape[0]
    if keep.size == 0:
        return (
            np.zeros((0, 2 * context_slices + 1, size, size), np.float16),
            np.zeros((0, size, size), np.uint8),
        )
    offsets = np.arange(-context_slices, context_slices + 1)
    needed = np.unique(np.clip(keep[:, None] + offsets[None, :], 0, n_z - 1))
    if box is None:
        pre = preprocess_image(vol.image, window=window, size=size, indices=needed)  # (m, S, S)
    else:
        # Crop chunk by chunk, like preprocess_image, so a long volume is never copied whole.
        pre = np.concatenate([
            preprocess_image(crop_slices(vol.image, box, indices=needed[i : i + _CHUNK]), window=window, size=size)
            for i in range(0, needed.size, _CHUNK)
        ])
    # Map original z -> row of ``pre``; stack_context on the compact array via searchsorted.
    gather = np.searchsorted(needed, np.clip(keep[:, None] + offsets[None, :], 0, n_z - 1))
    image = pre[gather].astype(np.float16)  # (n, 2K+1, S, S)
    if vol.label is not None and box is not None:
        label = resize_label(crop_slices(vol.label, box, indices=keep, fill=0), size=size)
    elif vol.label is not None:
        label = resize_label(vol.label[keep], size=size)
    else:
        label = np.zeros((keep.size, size, size), np.uint8)
    return image, label


def _check_label(vol: Volume, where: str) -> None:
    if vol.label is None:
        return
    if vol.label.shape != vol.image.shape:
        raise HepasegError(f"{where}: label shape: expected the image shape {vol.image.shape}, got {vol.label.shape}.")
    label = vol.label
    if label.size and label.dtype == np.uint8 and label.max() <= 2:
        return  # the usual case (io returns uint8): a max is much cheaper than np.unique
    values = np.unique(label)
    if any(v not in (0, 1, 2) for v in values):
        raise HepasegError(
            f"{where}: label values: expected {{0 background, 1 liver, 2 tumour}}, "
            f"got {sorted(int(v) for v in values)}. "
            "Convert the labels to the LiTS convention first."
        )


#: Shard compression: zlib level 1 writes 3x faster than numpy's default (level 6) for 4% more bytes
#: (float16 slices), and np.load reads any level. A fixed timestamp makes a shard depend on its
#: content only, so two runs -- with any number of workers -- write the same bytes.
SHARD_COMPRESSLEVEL = 1
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_shard(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` as an ``.npz`` (what ``np.load`` reads) deterministically: entries in the
    given order, fixed timestamps, deflate level :data:`SHARD_COMPRESSLEVEL`."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=SHARD_COMPRESSLEVEL) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            # A ZipInfo we build does not inherit the ZipFile's level (zipfile would use zlib's default
            # 6): set it, under its public name (Python >= 3.13) and its older private one.
            if hasattr(info, "compress_level"):  # pragma: no cover - Python >= 3.13
                info.compress_level = SHARD_COMPRESSLEVEL
            else:
                info._compresslevel = SHARD_COMPRESSLEVEL
            info.external_attr = 0o644 << 16  # -rw-r--r-- for unzip; numpy writes the same
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


@dataclass(frozen=True)
class _CaseOptions:
    """What one case's preparation needs (picklable: sent to worker processes)."""

    window: tuple[float, float]
    size: int
    slices: str
    context_slices: int
    roi: str | None
    roi_margin_mm: float
    z_opts: dict | None
    dicom: DicomOptions | None = None


def _prepare_case(path: Path, cases_dir: Path, opts: _CaseOptions) -> tuple[str, list[dict[str, Any]], str | None]:
    """Read one case, write its shard(s) into ``cases_dir``; return ``(case id, manifest entries, note)``.

    The entries' ``split`` is None (or the z block's with ``z_split``); :func:`prepare` assigns it.
    ``note`` says which series of a DICOM study was used, and why (None for other sources).
    """
    vol = read_volume(path, dicom=opts.dicom)  # labels too when the layout has them, even for --slices all
    note = None
    if "series_choice" in vol.meta:  # a DICOM study: say which series was used, and why
        series = vol.meta["series"]
        number = "-" if series.get("number") is None else series["number"]
        note = (f"{vol.case_id}: series #{number} {series.get('description') or 'no description'!r}"
                f" ({series['uid']}): {vol.meta['series_choice']}")
    where = f"{path}"
    if vol.image.ndim != 3:
        raise HepasegError(f"{path}: image: expected a 3D (z, y, x) volume, got shape {vol.image.shape}.")
    _check_label(vol, where)
    keep_all = (
        np.arange(vol.image.shape[0]) if opts.slices == "all" else select_slices(vol.label, opts.slices, where=where)
    )
    box = None
    if opts.roi is not None:
        if vol.label is None:
            raise HepasegError(
                f"{path}: has no label map but --roi liver crops to the labelled liver: expected a "
                "labelled case. Drop --roi, or remove unlabelled cases from the sources."
            )
        box = liver_crop_box(vol.label > 0, vol.spacing, margin_mm=opts.roi_margin_mm)
        if box is None:  # no liver: nothing to crop to, so no slice of this case is kept
            keep_all = keep_all[:0]
    if opts.z_opts is not None:
        blocks = _z_blocks(vol.image.shape[0], opts.z_opts["fractions"], opts.z_opts["gap"], where)
        parts = [(f"{vol.case_id}-z:{name}", name, np.intersect1d(keep_all, blk)) for name, blk in blocks.items()]
    else:
        parts = [(vol.case_id, None, keep_all)]
    entries = []
    for case_id, block_split, keep in parts:
        image, label = _process_volume(
            vol, keep, window=opts.window, size=opts.size, context_slices=opts.context_slices, box=box
        )
        shard = f"cases/{_safe_name(case_id)}.npz"
        write_shard(cases_dir.parent / shard, image=image, label=label, slice_index=keep.astype(np.int32))
        entries.append(
            {
                "id": case_id,
                "source": str(vol.source or path),
                "kind": vol.kind,
                "shape": list(vol.shape),
                "spacing": [float(s) for s in vol.spacing],
                "kept_slices": [int(z) for z in keep],
                "n_slices": int(keep.size),
                "tumor_pixels": int((label == LABEL_TUMOR).sum()),
                "liver_pixels": int((label > 0).sum()),
                "has_label": vol.label is not None,
                "crop_box": None if box is None else [int(b) for b in box],
                **(vol.source_geometry.as_dict() if vol.source_geometry is not None else {}),
                "split": block_split,
                "shard": shard,
            }
        )
    return vol.case_id, entries, note


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, MB (Linux reports KiB, macOS bytes); None on Windows."""
    if resource is None:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


#: The helpers' handle on the shared "next case" counter (set by :func:`_init_worker`).
_next_case: Any = None


def _init_worker(threads: int, next_case: Any) -> None:
    # Workers share the cores: without this each would start one torch thread per core.
    torch.set_num_threads(threads)
    global _next_case
    _next_case = next_case  # a shared counter can only reach a spawned process as it starts


def _claim(next_case: Any, n: int) -> int | None:
    """The index of the next unclaimed case (and claim it), or None when every case is taken."""
    with next_case.get_lock():
        i = next_case.value
        if i >= n:
            return None
        next_case.value = i + 1
        return i


def _stop_claims(next_case: Any, n: int) -> None:
    with next_case.get_lock():
        next_case.value = n


def _prepare_one(case_paths: Sequence[Path], i: int, cases_dir: Path, opts: _CaseOptions) -> tuple[str, Any]:
    """``("ok", (case_id, entries, note, pid, peak MB))`` or ``("error", exception)`` for case ``i``."""
    try:
        return "ok", (*_prepare_case(case_paths[i], cases_dir, opts), os.getpid(), _peak_rss_mb())
    except Exception as exc:  # noqa: BLE001 - re-raised in case order by _run_cases
        return "error", exc


def _prepare_claimed_case(case_paths: Sequence[Path], cases_dir: Path, opts: _CaseOptions) -> tuple | None:
    """In a helper: claim the next case and prepare it; ``(i, kind, value)``, or None when none was left."""
    i = _claim(_next_case, len(case_paths))
    return None if i is None else (i, *_prepare_one(case_paths, i, cases_dir, opts))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _run_cases(case_paths, cases_dir: Path, opts: _CaseOptions, workers: int, on_done) -> tuple[list, dict]:
    """``[(path, case_id, entries)]`` in ``case_paths`` order, and ``{pid: peak RSS MB}`` of the workers.

    ``on_done(path, case_id, note)`` is called for each case in ``case_paths`` order (it may raise).

    ``workers == 1`` runs in this process. With more, this process is one worker and starts
    ``workers - 1`` spawned helpers. Every worker takes the next case from one shared counter
    whenever it is free (memory: one volume per worker), so no case waits in a busy worker's
    queue while another worker idles, and this process starts on the first case at once instead
    of waiting for the helpers to import torch. Results are gathered in case order and the FIRST
    failing case in that order raises (a failure stops further claims; every earlier case was
    claimed before it and finishes), so the outcome never depends on which worker ran first.
    """
    if workers == 1:
        results = []
        for path in case_paths:
            case_id, entries, note = _prepare_case(path, cases_dir, opts)
            results.append((path, case_id, entries))
            on_done(path, case_id, note)
        return results, {os.getpid(): _peak_rss_mb()}
    threads = max(1, _usable_cores() // workers)
    n = len(case_paths)
    outcomes: dict[int, tuple[str, Any]] = {}  # case index -> ("ok", value) or ("error", exception)
    results: list = []
    peaks: dict[int, float | None] = {}
    main_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    # spawn, not fork: a forked child of a process that already ran torch's OpenMP pool can hang.
    context = multiprocessing.get_context("spawn")
    next_case = context.Value("l", 0)
    emitted = 0
    try:
        with ProcessPoolExecutor(max_workers=workers - 1, mp_context=context, initializer=_init_worker,
                                 initargs=(threads, next_case)) as pool:
            # One claim per case: a claim takes a case only when a helper starts it, and returns None
            # at once when this process has taken the rest.
            pending = {pool.submit(_prepare_claimed_case, case_paths, cases_dir, opts) for _ in range(n)}

            def harvest(block: bool) -> None:
                for future in [f for f in pending if block or f.done()]:
                    pending.discard(future)
                    claimed = future.result()
                    if claimed is not None:
                        outcomes[claimed[0]] = claimed[1:]
                        if claimed[1] == "error":
                            _stop_claims(next_case, n)

            def emit() -> None:
                # on_done in case order for the finished prefix; a failure stops the claims.
                nonlocal emitted
                while emitted in outcomes and outcomes[emitted][0] == "ok":
                    case_id, entries, note, pid, peak = outcomes[emitted][1]
                    try:
                        on_done(case_paths[emitted], case_id, note)
                    except Exception as exc:  # noqa: BLE001 - e.g. a duplicate case id
                        outcomes[emitted] = ("error", exc)
                        _stop_claims(next_case, n)
                        return
                    results.append((case_paths[emitted], case_id, entries))
                    peaks[pid] = peak if peaks.get(pid) is None else max(peak, peaks[pid])
                    emitted += 1

            try:
                while (i := _claim(next_case, n)) is not None:  # this process takes the next case itself
                    outcomes[i] = _prepare_one(case_paths, i, cases_dir, opts)
                    if outcomes[i][0] == "error":
                        _stop_claims(next_case, n)
                    harvest(block=False)
                    emit()
                harvest(block=True)
                emit()
            except BaseException:
                _stop_claims(next_case, n)
                for future in pending:
                    future.cancel()
                raise  # leaving the with-block waits for running cases before the caller removes tmp
    finally:
        torch.set_num_threads(main_threads)
    if emitted < n:
        raise outcomes[emitted][1]  # the first failing case in case order
    return results, peaks


def prepare(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    window: tuple[float, float] = (-200.0, 250.0),
    size: int = 224,
    slices: str | None = None,
    context_slices: int = 0,
    split: Sequence[float] | None = (0.7, 0.1, 0.2),
    seed: int = 0,
    split_file: str | os.PathLike | None = None,
    z_split: Sequence[float] | dict | None = None,
    target: str = "tumor",
    roi: str | None = None,
    roi_margin_mm: float = 10.0,
    val_fraction: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
    workers: int = 1,
    report: dict[str, Any] | None = None,
    dicom: DicomOptions | None = None,
) -> dict[str, Any]:
    """Prepare a slice dataset from CT volumes; see the module docstring for the format.

    Args:
        sources: files or folders (LiTS, MSD Task03, 3D-IRCADb, NIfTI, DICOM, MRC);
            every case found in them is used.
        out: output directory: new, empty, or (with ``overwrite``) an earlier prepare output
            (one carrying :data:`hepaseg.io.OUTPUT_MARKER`); never equal to, inside or around a source.
        window: HU window ``(lo, hi)``, ``lo < hi`` (default ``(-200, 250)``).
        size: slice size in pixels after resizing, > 0 (default 224).
        slices: ``tumor`` | ``liver`` | ``all``; default ``tumor``, or ``all`` with ``target="liver"``.
        context_slices: ``K >= 0`` neighbours each side stored as channels (default 0).
        split: ``(train, val, test)`` fractions summing to 1 (default ``(0.7, 0.1, 0.2)``);
            ignored when ``split_file`` or ``z_split`` is given.
        seed: seed of the patient shuffle (default 0).
        split_file: JSON ``{"train": [ids], "val": [...], "test": [...]}`` naming every case.
        z_split: demo only, one volume: three fractions, or ``{"fractions": [...], "gap": g}``.
        target: ``"tumor"`` (default) or ``"liver"`` (a liver stage: mask = label > 0); recorded
            in the manifest and copied into checkpoints.
        roi: None (default: whole slices) or ``"liver"``: crop each case to its liver box
            (tumour target only; see the module docstring).
        roi_margin_mm: margin of the liver box in mm, >= 0 (default 10).
        val_fraction: None (default) or a fraction in (0, 0.5]: validate on the last z-block of
            every training patient (the crossval rule, :mod:`hepaseg.data.zval`) instead of on
            val patients; the split's val fraction must be 0.
        overwrite: replace a previous prepare output at ``out``.
        progress: show a progress bar over volumes.
        console: where the progress bar and summary table go (default: stdout).
        workers: processes preparing cases side by side (default 1: this process; with more,
            this process and ``workers - 1`` spawned helpers). The output is byte for byte the
            same for any number; each worker holds one volume at a time. A script calling this
            with ``workers > 1`` needs the usual ``if __name__ == "__main__":`` guard (spawn).
        report: when given, filled with ``workers``, ``seconds`` (cases only: reading to shards)
            and ``peak_rss_mb`` (``{pid: MB}``: each worker's peak resident memory, or this
            process's with one worker, its whole life so far).
        dicom: series choice and SEG labels of DICOM study cases (``--series``, ``--seg`` for a
            single case, ``--seg-labels``); each study's SEG objects are found in its folder.

    Returns:
        The manifest (also written to ``out/manifest.json``).

    Raises:
        HepasegError: bad options, missing/empty sources, unreadable or invalid
            cases, unknown split ids, or an ``out`` that is not ours or overlaps a source
            (checked before any case is read). On any error
            nothing is left at ``out`` (a previous output is kept as it was).
    """
    roi_margin_mm = _check_stage_options(target, roi, roi_margin_mm, workers)
    if slices is None:
        slices = "all" if target == "liver" else "tumor"
    (lo, hi), fractions, z_opts = _check_options(window, size, slices, context_slices, split, z_split, split_file)
    if val_fraction is not None:
        val_fraction = _check_val_fraction_split(val_fraction, fractions, z_opts)
    out = Path(out)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    source_paths = [Path(s) for s in sources]
    split_path = Path(split_file) if split_file is not None else None
    # Only an earlier prepare output (marker) is replaced, and only with --overwrite.
    check_output_dir(out, command="prepare", inputs=[*source_paths, split_path], overwrite=overwrite)
    file_assignment = _read_split_file(split_path) if split_path is not None else None
    if val_fraction is not None and file_assignment is not None and "val" in file_assignment.values():
        raise HepasegError(
            f"{split_path}: --val-fraction with val cases in the split file: expected no 'val' case (the "
            "validation set is the last z-block of each training patient). Move them to train or test"
        )
    case_paths = _find_case_paths(source_paths, dicom, z_opts)

    console = console or Console()
    # Written into a temporary folder beside out and moved into place at the end (an earlier
    # output is replaced only then), so out is complete or untouched.
    with atomic_dir(out) as tmp:
        write_output_marker(tmp, "prepare")
        (tmp / "cases").mkdir()
        opts = _CaseOptions(window=(lo, hi), size=size, slices=slices, context_slices=context_slices, roi=roi,
                            roi_margin_mm=roi_margin_mm, z_opts=z_opts, dicom=dicom)
        cases = _prepare_cases(case_paths, tmp / "cases", opts, workers=workers, console=console, progress=progress,
                               report=report)
        if z_opts is None:
            assignment = _split_assignment([c["id"] for c in cases], file_assignment, split_path, fractions, seed)
            for c in cases:
                c["split"] = assignment[c["id"]]
        if val_fraction is not None:
            cases = _z_validation_blocks(tmp, cases, val_fraction, context_slices, console)
        manifest = {
            "format": FORMAT,
            "hepaseg_version": __version__,
            "n_slices": int(sum(c["n_slices"] for c in cases)),
            "options": {
                "window": [lo, hi],
                "size": size,
                "slices": slices,
                "context_slices": context_slices,
                "split": fractions,
                "split_file": str(split_path) if split_path is not None else None,
                "seed": seed,
                "z_split": z_opts,
                # Only when not the defaults, so whole-slice tumour manifests read as before the cascade.
                **({"target": target} if target != "tumor" else {}),
                **({"roi": roi, "roi_margin_mm": roi_margin_mm} if roi is not None else {}),
                **({"val_fraction": val_fraction, "val_gap": z_val_gap(context_slices)}
                   if val_fraction is not None else {}),
            },
            "demo_z_split": z_opts is not None,
            "orientation": CANONICAL_DESCRIPTION,
            "cases": cases,
        }
        write_json_atomic(tmp / "manifest.json", manifest)  # last file written
    console.print(summary_table(manifest, title=f"prepared slices -> {out}"))
    return manifest


def _check_stage_options(target: str, roi: str | None, roi_margin_mm: float, workers: int) -> float:
    """Check --target, --roi, --roi-margin and --workers; returns the margin in mm as a float."""
    if target not in PREPARE_TARGETS:
        raise HepasegError(f"--target: expected one of {', '.join(PREPARE_TARGETS)}, got {target!r}.")
    if roi is not None and roi not in ROI_MODES:
        raise HepasegError(f"--roi: expected one of {', '.join(ROI_MODES)} (or none), got {roi!r}.")
    if roi is not None and target == "liver":
        raise HepasegError(
            "--roi liver with --target liver: expected whole slices for the liver stage (it must find the liver "
            "itself). Drop --roi for the liver stage; use --roi liver for the tumour stage."
        )
    try:
        roi_margin_mm = float(roi_margin_mm)
    except (TypeError, ValueError):
        roi_margin_mm = math.nan
    if not (math.isfinite(roi_margin_mm) and roi_margin_mm >= 0):
        raise HepasegError(f"--roi-margin: expected a margin >= 0 in mm, got {roi_margin_mm!r}. Example: 10.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise HepasegError(f"--workers: expected a positive number of processes, got {workers!r}. Example: 2.")
    return roi_margin_mm


def _find_case_paths(source_paths: list[Path], dicom: DicomOptions | None, z_opts: dict | None) -> list[Path]:
    """The CT cases in the sources (checked: at least one; one with --seg or --z-split)."""
    if not source_paths:
        raise HepasegError("SOURCES: expected at least one file or folder of CT volumes, got none.")
    for src in source_paths:
        if not src.exists():
            raise HepasegError(f"{src}: source not found: expected an existing file or folder of CT volumes.")
    case_paths = list(find_cases(source_paths))
    if not case_paths:
        names = ", ".join(str(s) for s in source_paths)
        raise HepasegError(
            f"{names}: no CT cases found: expected LiTS, MSD, 3D-IRCADb, NIfTI, DICOM or MRC files. Check the path."
        )
    if dicom is not None and dicom.seg and len(case_paths) != 1:
        raise HepasegError(
            f"--seg: names the SEG files of one case: expected a single case, got {len(case_paths)}. Put each "
            "case's SEG in its study folder (it is found there)."
        )
    if z_opts is not None and len(case_paths) != 1:
        raise HepasegError(
            f"--z-split: expected a single-volume source (it splits one patient along z), got {len(case_paths)} cases."
        )
    return case_paths


def _prepare_cases(case_paths: list[Path], cases_dir: Path, opts: _CaseOptions, *, workers: int, console: Console,
                   progress: bool, report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Prepare every case into ``cases_dir`` (on ``workers`` processes) under a progress bar; returns the
    manifest entries in case order. Raises on a case id that two sources give."""
    seen: dict[str, str] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    started = time.perf_counter()
    with Progress(*columns, console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("preparing", total=len(case_paths))

        def done(path: Path, case_id: str, note: str | None) -> None:  # called in case order
            if note is not None:
                console.print(note, highlight=False, soft_wrap=True)
            if case_id in seen:
                raise HepasegError(
                    f"{path}: case id {case_id!r} also comes from {seen[case_id]}: "
                    "expected each case once. Remove the duplicate source."
                )
            seen[case_id] = str(path)
            bar.update(task, description=f"prepared {Path(path).name}")
            bar.advance(task)

        results, peaks = _run_cases(case_paths, cases_dir, opts, workers, done)
    cases: list[dict[str, Any]] = []
    for _path, _case_id, entries in results:
        cases.extend(entries)
    if report is not None:
        report.update(workers=workers, seconds=time.perf_counter() - started, peak_rss_mb=peaks)
    return cases


def _split_assignment(ids: list[str], file_assignment: dict[str, str] | None, split_path: Path | None,
                      fractions, seed: int) -> dict[str, str]:
    """``{case id: train | val | test}``: the split file's (checked against the cases), else a seeded shuffle."""
    if file_assignment is None:
        return split_cases(ids, fractions, seed=seed)  # type: ignore[arg-type]
    missing = [i for i in ids if i not in file_assignment]
    unknown = [i for i in file_assignment if i not in ids]
    if missing:
        raise HepasegError(
            f"{split_path}: cases not listed in the split file: {', '.join(missing)}: "
            "expected every case in train, val or test. Add them to the split file."
        )
    if unknown:
        raise HepasegError(
            f"{split_path}: unknown case ids {', '.join(unknown)}: expected ids of the sources "
            f"({', '.join(sorted(ids))}). Fix the split file."
        )
    return file_assignment


def _z_validation_blocks(tmp: Path, cases: list[dict[str, Any]], val_fraction: float, context_slices: int,
                         console: Console) -> list[dict[str, Any]]:
    """--val-fraction: the last z-block of each training patient becomes its validation case."""
    cases = _split_training_patients(tmp, cases, val_fraction, z_val_gap(context_slices))
    if not any(c["split"] == "val" for c in cases):
        console.print(
            f"[yellow]warning:[/] --val-fraction {val_fraction:g}: no training patient has enough kept "
            "slices for a validation block; `hepaseg train` will train without validation (last.ckpt only)",
            highlight=False,
        )
    return cases


