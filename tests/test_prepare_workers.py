"""`hepaseg prepare --workers N`: the same bytes as one worker, the first failing case in order, memory reported."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from hepaseg.data.phantom import write_phantom_dataset
from hepaseg.data.prepare import prepare, write_shard
from hepaseg.errors import HepasegError

SHAPE = (10, 48, 48)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def four_cases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lits4")
    write_phantom_dataset(root, "lits", n_cases=4, shape=SHAPE, seed=3)
    return root


def test_two_workers_write_the_same_bytes_as_one(four_cases, tmp_path):
    kw = {"size": 24, "slices": "all", "context_slices": 1, "progress": False}
    report1, report2 = {}, {}
    m1 = prepare(four_cases, tmp_path / "w1", workers=1, report=report1, **kw)
    m1b = prepare(four_cases, tmp_path / "w1b", **kw)  # a second run: shards depend on content only
    m2 = prepare(four_cases, tmp_path / "w2", workers=2, report=report2, **kw)
    assert m1 == m1b == m2 and m1["n_slices"] == 4 * SHAPE[0]
    tree = _tree(tmp_path / "w1")
    assert len(tree) == 6  # manifest, output marker, four shards
    assert tree == _tree(tmp_path / "w1b") == _tree(tmp_path / "w2")
    assert report1["workers"] == 1 and len(report1["peak_rss_mb"]) == 1
    assert report2["workers"] == 2 and 1 <= len(report2["peak_rss_mb"]) <= 2
    assert all(mb > 0 for mb in report2["peak_rss_mb"].values()) and report2["seconds"] > 0


def test_the_first_failing_case_in_order_is_reported_and_nothing_is_left(four_cases, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in four_cases.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    for i in (1, 3):  # two broken volumes: the error must name case 1 whichever worker fails first
        data = (src / f"volume-{i}.nii.gz").read_bytes()
        (src / f"volume-{i}.nii.gz").write_bytes(gzip.compress(gzip.decompress(data)[:400]))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(HepasegError, match="volume-1"):
        prepare(src, work / "out", size=24, slices="all", workers=2, progress=False)
    assert list(work.iterdir()) == []  # no out, no manifest, no temp dir


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_workers_must_be_a_positive_integer(four_cases, tmp_path, bad):
    with pytest.raises(HepasegError, match="--workers"):
        prepare(four_cases, tmp_path / "out", workers=bad, progress=False)
    assert not (tmp_path / "out").exists()


def test_shards_are_what_np_load_reads(tmp_path):
    arrays = {"image": np.arange(24, dtype=np.float16).reshape(2, 3, 4), "label": np.ones((2, 4), np.uint8)}
    write_shard(tmp_path / "a.npz", **arrays)
    with np.load(tmp_path / "a.npz") as npz:
        assert npz.files == ["image", "label"]
        for key, value in arrays.items():
            assert npz[key].dtype == value.dtype
            np.testing.assert_array_equal(npz[key], value)
