"""Validation without giving up a patient: each training patient's last z-block.

One rule, shared by ``hepaseg prepare --val-fraction F`` and ``hepaseg crossval`` (its
fold directories), so a dataset prepared for "train on every patient" validates exactly
as a crossval fold does:

* A patient's kept slices ``z`` (ascending original z indices, ``n`` of them) are cut in
  two contiguous blocks: the **validation block** is the last
  ``n_val = max(1, floor(F * n + 0.5))`` kept slices, and the **training block** is every
  kept slice more than ``gap`` z positions below the first validation slice.
* ``gap = 2K + 2`` (``K`` = context slices, :func:`z_val_gap`), as ``prepare --z-split``:
  no context channel of a training slice shows a validation slice.
* A patient too small to leave a training block keeps every slice for training and gives
  no validation slice.
* The case ``<id>`` becomes ``<id>-z:train`` (split ``train``) and ``<id>-z:val`` (split
  ``val``), each with ``patient: <id>``; every per-slice array of its shard (leading
  dimension = the case's slice count: image, label, slice_index) and ``kept_slices`` are cut
  the same way, ``tumor_pixels``/``liver_pixels`` recounted.

The validation block belongs to a TRAINING patient: it monitors training (and, in
``hepaseg train``, selects ``best.ckpt``), but its scores are not held-out scores.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from hepaseg.errors import HepasegError
from hepaseg.io.volume import LABEL_TUMOR

__all__ = ["check_val_fraction", "split_case_along_z", "val_note", "z_val_gap", "z_val_rows"]


def z_val_gap(context_slices: int) -> int:
    """Unused z positions between the training and the validation block: ``2K + 2``."""
    return 2 * int(context_slices) + 2


def check_val_fraction(value: Any, option: str = "--val-fraction") -> float:
    """``value`` as a float in (0, 0.5], or a one-line HepasegError naming ``option``."""
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0.0 < fraction <= 0.5:
        raise HepasegError(f"{option}: expected a fraction in (0, 0.5], got {value!r}. Example: {option} 0.15")
    return fraction


def z_val_rows(z: np.ndarray, val_fraction: float, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, val)`` into one patient's kept slices ``z`` (ascending original indices).

    Val = the last ``max(1, floor(val_fraction * n + 0.5))`` kept slices; train = the kept slices
    more than ``gap`` z positions below the first val slice. A patient too small to leave a
    training block keeps every slice for training (and gives no val slice).

    Example: ``z = [0..19]``, 0.15, gap 2 -> val rows 17..19 (3 slices), train rows 0..14.
    """
    z = np.asarray(z, dtype=np.int64)
    n = z.size
    if n == 0:
        return np.arange(0), np.arange(0)
    n_val = max(1, math.floor(val_fraction * n + 0.5))
    first_val = z[n - n_val]
    train = np.flatnonzero(z < first_val - gap)
    if train.size == 0:
        return np.arange(n), np.arange(0)
    return train, np.arange(n - n_val, n)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def split_case_along_z(
    src_root: str | Path, case: dict[str, Any], dest_root: str | Path, *, val_fraction: float, gap: int
) -> list[dict[str, Any]]:
    """Write the ``<id>-z:train`` / ``<id>-z:val`` shards of one prepared case (module docstring).

    Args:
        src_root: the prepared directory holding ``case["shard"]``.
        case: the case's manifest entry (``id``, ``n_slices``, ``kept_slices``, ``shard``...).
        dest_root: where the new shards go (``dest_root/cases/<safe id>.npz``); may be ``src_root``.
        val_fraction: share of the case's kept slices in the validation block, in (0, 0.5].
        gap: unused z positions between the blocks (:func:`z_val_gap`).

    Returns:
        The new manifest entries (training block first; the validation block only when the
        case is large enough). The source shard is left in place.
    """
    src_root, dest_root = Path(src_root), Path(dest_root)
    n = int(case["n_slices"])
    z = np.asarray(case["kept_slices"], dtype=np.int64)
    with np.load(src_root / case["shard"]) as npz:
        arrays = {k: npz[k] for k in npz.files}
    entries = []
    for split, rows in zip(("train", "val"), z_val_rows(z, float(val_fraction), int(gap))):
        if rows.size == 0:
            continue
        cid = f"{case['id']}-z:{split}"
        part = {k: (a[rows] if a.ndim and a.shape[0] == n else a) for k, a in arrays.items()}
        shard = f"cases/{_safe_name(cid)}.npz"
        np.savez_compressed(dest_root / shard, **part)
        label = part["label"]
        entry = dict(case)
        entry.update(id=cid, patient=case["id"], kept_slices=[int(z[i]) for i in rows], n_slices=int(rows.size),
                     split=split, shard=shard, tumor_pixels=int((label == LABEL_TUMOR).sum()),
                     liver_pixels=int((label > 0).sum()))
        entries.append(entry)
    return entries


def val_note(manifest: dict[str, Any]) -> str | None:
    """One sentence for tables when the manifest's val split is a z-block of training patients, else None.

    Covers ``prepare --val-fraction`` (``options.val_fraction``) and crossval fold directories
    (``crossval.val_fraction``).
    """
    options = manifest.get("options", {}) or {}
    rule = options.get("val_fraction"), options.get("val_gap")
    if rule[0] is None and isinstance(manifest.get("crossval"), dict):
        rule = manifest["crossval"].get("val_fraction"), manifest["crossval"].get("gap")
    if rule[0] is None:
        return None
    return (f"validation = the last {float(rule[0]):g} of each training patient's kept slices (a z-block "
            f"{rule[1]} z positions from its training block, `prepare --val-fraction`): slices of TRAINING "
            "patients, so val scores are optimistic and not held-out scores")
