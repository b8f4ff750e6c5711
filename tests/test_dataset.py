"""SliceDataset over a prepared directory: items, targets, splits, errors, seeded MONAI augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hepaseg.data.dataset import SliceDataset
from hepaseg.data.phantom import write_phantom_dataset
from hepaseg.data.prepare import prepare
from hepaseg.errors import HepasegError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    write_phantom_dataset(root / "lits", "lits", n_cases=3, shape=(12, 64, 64), seed=0)
    split = root / "split.json"
    split.write_text(json.dumps({"train": ["lits-0", "lits-2"], "val": ["lits-1"], "test": []}))
    prepare([root / "lits"], root / "prep", size=32, context_slices=1, split_file=split, progress=False)
    return root / "prep"


def _shards(root: Path, split: str) -> list[tuple[str, dict]]:
    manifest = json.loads((root / "manifest.json").read_text())
    out = []
    for case in manifest["cases"]:
        if case["split"] == split:
            with np.load(root / case["shard"]) as npz:
                out.append((case["id"], {k: npz[k] for k in npz.files}))
    return out


def test_items_match_shards(prepared):
    ds = SliceDataset(prepared, "train")
    shards = _shards(prepared, "train")
    assert ds.in_channels == 3 and ds.options["context_slices"] == 1
    assert ds.case_ids == ["lits-0", "lits-2"]
    expected_keys = [(cid, int(z)) for cid, s in shards for z in s["slice_index"]]
    assert ds.slice_keys == expected_keys and len(ds) == len(expected_keys)
    images = np.concatenate([s["image"] for _, s in shards]).astype(np.float32)
    labels = np.concatenate([s["label"] for _, s in shards])
    for i in (0, len(ds) // 2, len(ds) - 1):
        image, mask = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        assert mask.dtype == torch.float32 and mask.shape == (1, 32, 32)
        np.testing.assert_array_equal(image.numpy(), images[i])
        np.testing.assert_array_equal(mask[0].numpy(), (labels[i] == 2).astype(np.float32))
    assert sum(float(ds[i][1].sum()) for i in range(len(ds))) == float((labels == 2).sum()) > 0


def test_liver_target_and_val_split(prepared):
    ds = SliceDataset(prepared, "val", target="liver")
    ((cid, shard),) = _shards(prepared, "val")
    assert ds.case_ids == [cid] == ["lits-1"]
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i][1][0].numpy(), (shard["label"][i] > 0).astype(np.float32))


def test_dataloader_batches(prepared):
    batch_image, batch_mask = next(iter(DataLoader(SliceDataset(prepared, augment=True), batch_size=4)))
    assert batch_image.shape == (4, 3, 32, 32) and batch_mask.shape == (4, 1, 32, 32)
    assert type(batch_image) is torch.Tensor  # plain tensors, not MONAI MetaTensors


def test_augmentation_is_seeded_binary_and_changes_images(prepared):
    a = SliceDataset(prepared, "train", augment=True, seed=7)
    b = SliceDataset(prepared, "train", augment=True, seed=7)
    plain = SliceDataset(prepared, "train")
    # same seed, same index -> same sample, whatever the access order
    order = [3, 0, 5, 3]
    first = [a[i] for i in order]
    second = [b[i] for i in reversed(order)][::-1]
    for (xa, ma), (xb, mb) in zip(first, second):
        torch.testing.assert_close(xa, xb)
        torch.testing.assert_close(ma, mb)
    changed = 0
    for i in range(len(a)):
        x, m = a[i]
        assert x.shape == (3, 32, 32) and m.shape == (1, 32, 32)
        assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
        changed += not torch.equal(x, plain[i][0])
    assert changed >= len(a) // 3  # p(no transform at all) = 0.5^4
    other = SliceDataset(prepared, "train", augment=True, seed=8)
    assert any(not torch.equal(a[i][0], other[i][0]) for i in range(len(a)))
    a.set_epoch(1)  # a new epoch draws new augmentations; b stays at epoch 0
    assert any(not torch.equal(a[i][0], b[i][0]) for i in range(len(a)))


def test_flip_moves_mask_with_image(prepared):
    from monai.transforms import RandAffined, RandShiftIntensityd

    ds = SliceDataset(prepared, "train", augment=True, seed=0)
    # keep only the two flips: each augmented pair must be a flip of the plain pair
    ds._augment.transforms = tuple(
        t for t in ds._augment.transforms if not isinstance(t, (RandAffined, RandShiftIntensityd))
    )
    plain = SliceDataset(prepared, "train")
    for i in range(len(ds)):
        x, m = ds[i]
        x0, m0 = plain[i]
        matches = [
            dims for dims in ([], [1], [2], [1, 2])
            if torch.equal(x, x0.flip(dims) if dims else x0) and torch.equal(m, m0.flip(dims) if dims else m0)
        ]  # fmt: skip
        assert matches, f"item {i} is not a joint flip of image and mask"


def test_empty_split_names_split_and_directory(prepared):
    with pytest.raises(HepasegError, match="split 'test' has no slices") as info:
        SliceDataset(prepared, "test")
    assert str(prepared) in str(info.value)


def test_bad_arguments(prepared):
    with pytest.raises(ValueError, match="split"):
        SliceDataset(prepared, "training")
    with pytest.raises(ValueError, match="target"):
        SliceDataset(prepared, target="vessel")


def test_missing_or_invalid_manifest(tmp_path, prepared):
    with pytest.raises(HepasegError, match="manifest not found"):
        SliceDataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(HepasegError, match="not valid JSON"):
        SliceDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/2", "cases": []}))
    with pytest.raises(HepasegError, match="format"):
        SliceDataset(tmp_path)


def test_missing_shard(tmp_path, prepared):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_text((prepared / "manifest.json").read_text())
    with pytest.raises(HepasegError, match="missing"):
        SliceDataset(copy, "train")
