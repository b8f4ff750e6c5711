"""A tiny prepared slice dataset written directly in the ``hepaseg-slices/1`` format.

Training tests use this instead of ``hepaseg prepare`` so that they depend only
on the on-disk format (manifest.json + cases/<id>.npz), not on the preparation code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hepaseg.io import CANONICAL_DESCRIPTION

__all__ = ["make_tiny_dataset"]


def make_tiny_dataset(
    root: str | Path, n_cases: int = 3, n_slices: int = 6, size: int = 32, seed: int = 0, context_slices: int = 1
) -> Path:
    """Write ``n_cases`` cases of ``n_slices`` slices of ``size x size`` pixels under ``root``.

    Each slice: a liver disc (label 1, intensity ~0.5) on a dark background, with
    a brighter tumour disc (label 2, ~0.85) in every slice but the first, so
    the tumour is easy to learn and one slice per case is tumour-free.
    Splits: the last case is ``val``, the others ``train``.
    Image float16 ``(n, 2K + 1, S, S)`` in [0, 1]; label uint8 ``(n, S, S)``;
    slice_index int32 ``(n,)``.
    """
    root = Path(root)
    (root / "cases").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    c = 2 * context_slices + 1
    cases = []
    for i in range(n_cases):
        label = np.zeros((n_slices, size, size), np.uint8)
        volume = np.zeros((n_slices, size, size), np.float32)
        for z in range(n_slices):
            cy, cx = rng.uniform(0.4, 0.6, 2) * size
            liver = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.35 * size) ** 2
            label[z][liver] = 1
            if z > 0:
                ty, tx = cy + rng.uniform(-0.12, 0.12) * size, cx + rng.uniform(-0.12, 0.12) * size
                r = rng.uniform(0.08, 0.15) * size
                label[z][((yy - ty) ** 2 + (xx - tx) ** 2 < r**2) & liver] = 2
            volume[z] = np.choose(label[z], [0.1, 0.5, 0.85]) + rng.normal(0, 0.03, (size, size))
        volume = np.clip(volume, 0, 1)
        # Context channels: neighbours z-K..z+K, edge slices repeated at the ends.
        idx = np.clip(np.arange(n_slices)[:, None] + np.arange(-context_slices, context_slices + 1), 0, n_slices - 1)
        image = volume[idx].astype(np.float16)  # (n, 2K+1, S, S)
        case_id = f"case{i:02d}"
        np.savez_compressed(root / "cases" / f"{case_id}.npz", image=image, label=label,
                 slice_index=np.arange(n_slices, dtype=np.int32))
        cases.append({
            "id": case_id, "source": "synthetic", "kind": "tiny", "shape": [n_slices, size, size],
            "spacing": [2.0, 1.0, 1.0], "kept_slices": list(range(n_slices)), "n_slices": n_slices,
            "tumor_pixels": int((label == 2).sum()), "liver_pixels": int((label > 0).sum()), "has_label": True,
            "split": "val" if i == n_cases - 1 else "train", "shard": f"cases/{case_id}.npz",
        })
    assert c == image.shape[1]
    manifest = {
        "format": "hepaseg-slices/1",
        "n_slices": n_cases * n_slices,
        "hepaseg_version": "0.1.0",
        "options": {"window": [-100, 200], "size": size, "slices": "all", "context_slices": context_slices,
                    "split": None, "split_file": None, "seed": seed, "z_split": None},
        "demo_z_split": False,
        "orientation": CANONICAL_DESCRIPTION,
        "cases": cases,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
