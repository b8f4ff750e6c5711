"""`hepaseg prepare`: windowing, resizing, slice selection, context, patient splits, atomic output, errors."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from hepaseg.cli import app
from hepaseg.data.phantom import make_phantom, write_phantom_dataset
from hepaseg.data.prepare import FORMAT, prepare, split_cases, stack_context
from hepaseg.errors import HepasegError

# hepaseg.data re-exports the function ``prepare``, which shadows the submodule as a package
# attribute; take the module itself to monkeypatch its reader.
prep = importlib.import_module("hepaseg.data.prepare")

SHAPE = (12, 48, 48)  # (z, y, x); 48 -> 24 is an exact 2x downsample
WINDOW = (-200.0, 250.0)


def _run(sources, out, **kw):
    kw.setdefault("progress", False)
    return prepare(sources, out, **kw)


@pytest.fixture(scope="module")
def lits_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lits")
    write_phantom_dataset(root, "lits", n_cases=3, shape=SHAPE, seed=0)
    return root


def _load(out: Path, case: dict) -> dict:
    with np.load(out / case["shard"]) as npz:
        return {k: npz[k] for k in npz.files}


# --- format and content -------------------------------------------------------------------------


def test_manifest_and_shards_match_independent_reference(lits_dir, tmp_path):
    out = tmp_path / "prep"
    manifest = _run([lits_dir], out, size=24)
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert manifest["format"] == FORMAT and manifest["hepaseg_version"] == "0.1.0"
    assert manifest["options"] == {
        "window": list(WINDOW), "size": 24, "slices": "tumor", "context_slices": 0,
        "split": [0.7, 0.1, 0.2], "split_file": None, "seed": 0, "z_split": None,
    }  # fmt: skip
    assert manifest["demo_z_split"] is False
    assert [c["id"] for c in manifest["cases"]] == ["lits-0", "lits-1", "lits-2"]
    assert manifest["n_slices"] == sum(c["n_slices"] for c in manifest["cases"])
    for i, case in enumerate(manifest["cases"]):
        ref = make_phantom(SHAPE, seed=i)
        hu = np.round(ref.image)  # the phantom files store int16 HU
        keep = np.flatnonzero((ref.label == 2).any(axis=(1, 2)))
        assert case["kept_slices"] == keep.tolist() and case["n_slices"] == keep.size > 0
        assert case["shape"] == list(SHAPE) and case["spacing"] == pytest.approx([2.5, 0.8, 0.8])
        assert case["kind"] == "lits" and case["shard"] == f"cases/lits-{i}.npz" and case["has_label"]
        shard = _load(tmp_path / "prep", case)
        assert shard["image"].dtype == np.float16 and shard["image"].shape == (keep.size, 1, 24, 24)
        assert shard["label"].dtype == np.uint8 and shard["label"].shape == (keep.size, 24, 24)
        assert shard["slice_index"].dtype == np.int32 and shard["slice_index"].tolist() == keep.tolist()
        # bilinear, align_corners=False, exact 2x: each output pixel is the mean of a 2x2 block
        windowed = (np.clip(hu[keep], *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
        block_mean = windowed.reshape(keep.size, 24, 2, 24, 2).mean(axis=(2, 4))
        np.testing.assert_allclose(shard["image"][:, 0].astype(np.float32), block_mean, atol=1e-3)
        # nearest-exact, 2x: pixel i samples source pixel 2i + 1
        np.testing.assert_array_equal(shard["label"], ref.label[keep][:, 1::2, 1::2])
        assert case["tumor_pixels"] == int((shard["label"] == 2).sum())
        assert case["liver_pixels"] == int((shard["label"] > 0).sum())


def test_no_resize_keeps_windowed_values_and_selection_modes(lits_dir, tmp_path):
    ref = make_phantom(SHAPE, seed=0)
    for mode, hit in (("liver", ref.label > 0), ("all", np.ones(SHAPE, bool))):
        manifest = _run([lits_dir / "volume-0.nii.gz"], tmp_path / mode, size=48, slices=mode)
        (case,) = manifest["cases"]
        keep = np.flatnonzero(hit.any(axis=(1, 2)))
        assert case["kept_slices"] == keep.tolist()
        shard = _load(tmp_path / mode, case)
        expected = (np.clip(np.round(ref.image[keep]), *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
        np.testing.assert_allclose(shard["image"][:, 0].astype(np.float32), expected, atol=5e-4)
        np.testing.assert_array_equal(shard["label"], ref.label[keep])


def test_context_slices_stack_neighbours_with_repeated_edges(lits_dir, tmp_path):
    all_m = _run([lits_dir / "volume-1.nii.gz"], tmp_path / "all", size=24, slices="all")
    ctx_m = _run([lits_dir / "volume-1.nii.gz"], tmp_path / "ctx", size=24, slices="all", context_slices=2)
    plain = _load(tmp_path / "all", all_m["cases"][0])["image"][:, 0]  # (z, 24, 24)
    ctx = _load(tmp_path / "ctx", ctx_m["cases"][0])["image"]  # (z, 5, 24, 24)
    assert ctx.shape == (SHAPE[0], 5, 24, 24)
    for z in range(SHAPE[0]):
        for j in range(5):
            np.testing.assert_array_equal(ctx[z, j], plain[min(max(z + j - 2, 0), SHAPE[0] - 1)])


def test_stack_context_small_example():
    slices = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)  # slice z == z
    out = stack_context(slices, [0, 3], 1)
    assert out.shape == (2, 3, 2, 2)
    assert out[:, :, 0, 0].tolist() == [[0, 0, 1], [2, 3, 3]]


# --- splits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, expected", [(1, (1, 0, 0)), (2, (2, 0, 0)), (3, (2, 0, 1)), (10, (7, 1, 2))])
def test_split_rounding(n, expected):
    ids = [f"c{i:02d}" for i in range(n)]
    got = split_cases(ids, (0.7, 0.1, 0.2), seed=0)
    counts = tuple(list(got.values()).count(s) for s in ("train", "val", "test"))
    assert counts == expected and sorted(got) == ids


def test_split_is_seeded_and_independent_of_input_order():
    ids = [f"case-{i}" for i in range(20)]
    a = split_cases(ids, (0.6, 0.2, 0.2), seed=1)
    assert a == split_cases(list(reversed(ids)), (0.6, 0.2, 0.2), seed=1)
    assert a != split_cases(ids, (0.6, 0.2, 0.2), seed=2)
    # reference: sort, permute with default_rng(seed), cut 12 / 4 / 4
    order = [sorted(ids)[i] for i in np.random.default_rng(1).permutation(20)]
    assert [a[c] for c in order] == ["train"] * 12 + ["val"] * 4 + ["test"] * 4


def test_split_file_assigns_patients(lits_dir, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["lits-2"], "val": ["lits-0"], "test": ["lits-1"]}))
    manifest = _run([lits_dir], tmp_path / "out", size=24, split_file=split)
    assert {c["id"]: c["split"] for c in manifest["cases"]} == {
        "lits-0": "val",
        "lits-1": "test",
        "lits-2": "train",
    }
    assert manifest["options"]["split"] is None and manifest["options"]["split_file"] == str(split)


@pytest.mark.parametrize(
    "content, match",
    [
        ({"train": ["lits-0", "lits-1"], "test": ["lits-2", "lits-9"]}, "unknown case ids lits-9"),
        ({"train": ["lits-0"], "test": ["lits-1"]}, "not listed in the split file: lits-2"),
        ({"train": ["lits-0", "lits-1", "lits-2"], "holdout": []}, "keys"),
        ({"train": ["lits-0", "lits-1"], "test": ["lits-1", "lits-2"]}, "both"),
    ],
)
def test_bad_split_file(lits_dir, tmp_path, content, match):
    split = tmp_path / "split.json"
    split.write_text(json.dumps(content))
    with pytest.raises(HepasegError, match=match):
        _run([lits_dir], tmp_path / "out", size=24, split_file=split)
    assert not (tmp_path / "out").exists()


def test_z_split_demo_blocks(lits_dir, tmp_path):
    src = lits_dir / "volume-2.nii.gz"
    manifest = _run([src], tmp_path / "z", size=24, slices="all", context_slices=1, z_split=(0.5, 0.25, 0.25))
    assert manifest["demo_z_split"] is True
    z = manifest["options"]["z_split"]
    assert z["fractions"] == [0.5, 0.25, 0.25] and z["gap"] == 4 and "demo only" in z["note"]
    cases = {c["split"]: c for c in manifest["cases"]}
    assert [c["id"] for c in manifest["cases"]] == ["lits-2-z:train", "lits-2-z:val", "lits-2-z:test"]
    assert cases["train"]["shard"] == "cases/lits-2-z_train.npz"
    # 12 slices - 2 gaps of 4 = 4 usable: test 1, val 1, train 2; blocks in z order, 4 slices apart
    assert cases["train"]["kept_slices"] == [0, 1]
    assert cases["val"]["kept_slices"] == [6] and cases["test"]["kept_slices"] == [11]
    # no slice appears in the context window of two blocks (K = 1)
    windows = {s: {z + d for z in c["kept_slices"] for d in (-1, 0, 1)} for s, c in cases.items()}
    assert not (windows["train"] & windows["val"]) and not (windows["val"] & windows["test"])


def test_z_split_needs_one_volume_and_enough_gap(lits_dir, tmp_path):
    with pytest.raises(HepasegError, match="single-volume"):
        _run([lits_dir], tmp_path / "z", size=24, z_split=(0.6, 0.2, 0.2))
    with pytest.raises(HepasegError, match="z-gap"):
        _run(
            [lits_dir / "volume-0.nii.gz"],
            tmp_path / "z",
            context_slices=2,
            z_split={"fractions": [0.6, 0.2, 0.2], "gap": 3},
        )


# --- output handling ----------------------------------------------------------------------------


def test_existing_output_refused_unless_overwrite(lits_dir, tmp_path):
    out = tmp_path / "out"
    _run([lits_dir / "volume-0.nii.gz"], out, size=24)
    with pytest.raises(HepasegError, match="--overwrite"):
        _run([lits_dir / "volume-1.nii.gz"], out, size=24)
    manifest = _run([lits_dir / "volume-1.nii.gz"], out, size=24, overwrite=True)
    assert [c["id"] for c in manifest["cases"]] == ["lits-1"]
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["lits-1.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left


def test_output_with_other_files_is_refused(lits_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(HepasegError, match="holds files hepaseg did not write"):
        _run([lits_dir], out, size=24, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run([lits_dir / "volume-0.nii.gz"], empty, size=24)["n_slices"] > 0


def test_failure_mid_way_leaves_nothing(lits_dir, tmp_path, monkeypatch):
    real = prep.read_volume
    calls = []

    def flaky(path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise HepasegError(f"{path}: simulated read failure")
        return real(path, **kw)

    monkeypatch.setattr(prep, "read_volume", flaky)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(HepasegError, match="simulated"):
        _run([lits_dir], work / "out", size=24)
    assert len(calls) == 2
    assert list(work.iterdir()) == []  # no out, no manifest, no temp dir


# --- bad input ----------------------------------------------------------------------------------


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(HepasegError, match="nope"):
        _run([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HepasegError, match="empty"):
        _run([tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_label_values_outside_0_1_2(tmp_path):
    write_phantom_dataset(tmp_path / "bad", "lits", n_cases=1, shape=SHAPE)
    seg_path = tmp_path / "bad" / "segmentation-0.nii.gz"
    seg = nib.load(seg_path)
    data = np.asarray(seg.dataobj).copy()
    data[5, 5, 5] = 7
    nib.save(nib.Nifti1Image(data, seg.affine), seg_path)
    with pytest.raises(HepasegError, match="label") as info:
        _run([tmp_path / "bad"], tmp_path / "out")
    assert "7" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unlabelled_volume_needs_slices_all(tmp_path):
    vol = make_phantom(SHAPE)
    nib.save(nib.Nifti1Image(vol.image.transpose(2, 1, 0), vol.affine), tmp_path / "scan.nii.gz")
    with pytest.raises(HepasegError, match="slices all"):
        _run([tmp_path / "scan.nii.gz"], tmp_path / "out")
    manifest = _run([tmp_path / "scan.nii.gz"], tmp_path / "out", slices="all", size=24)
    assert manifest["cases"][0]["n_slices"] == SHAPE[0] and manifest["cases"][0]["has_label"] is False


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": (250, -200)}, "--window"),
        ({"window": (100, 100)}, "--window"),
        ({"size": 0}, "--size"),
        ({"size": -3}, "--size"),
        ({"slices": "lesion"}, "--slices"),
        ({"context_slices": -1}, "--context-slices"),
        ({"split": (0.5, 0.1, 0.1)}, "--split"),
        ({"split": (0.0, 0.5, 0.5)}, "--split"),
    ],
)
def test_bad_options(lits_dir, tmp_path, kwargs, match):
    with pytest.raises(HepasegError, match=match):
        _run([lits_dir], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_prepare(lits_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(
        app, ["prepare", str(lits_dir), "--out", str(out), "--size", "24", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "lits-0" in result.output and (out / "manifest.json").is_file()
    bad = runner.invoke(app, ["prepare", str(lits_dir), "--out", str(tmp_path / "x"), "--window", "300,-100"])
    assert bad.exit_code == 1 and "--window" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["prepare", str(lits_dir), "--out", str(tmp_path / "x"), "--split", "0.7,0.3"])
    assert bad.exit_code == 1 and "--split" in bad.output


# --- real data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ircadb_volume(ircadb_dir):
    from hepaseg.io import read_volume

    return read_volume(ircadb_dir)  # read once per module: it is 129 DICOM slices of 512 x 512


@pytest.mark.realdata
@pytest.mark.parametrize("mode, n_expected", [("tumor", 74), ("liver", 98)])
def test_ircadb_known_slice_counts(ircadb_volume, ircadb_dir, tmp_path, monkeypatch, mode, n_expected):
    monkeypatch.setattr(prep, "read_volume", lambda path, **kw: ircadb_volume)
    manifest = _run([ircadb_dir], tmp_path / "out", size=64, slices=mode)
    (case,) = manifest["cases"]
    assert case["id"] == "ircadb-1.1" and case["kind"] == "ircadb" and case["shape"] == [129, 512, 512]
    assert case["n_slices"] == manifest["n_slices"] == n_expected
    assert case["split"] == "train"  # one patient: train only


@pytest.mark.realdata
def test_lits117_known_tumour_slices(lits117_dir, tmp_path):
    manifest = _run([lits117_dir], tmp_path / "out", size=64)
    assert manifest["n_slices"] == 123 and manifest["cases"][0]["id"] == "lits-117"  # axial tumour slices


@pytest.mark.realdata
def test_cli_prepare_z_split_of_the_lits117_sample(lits117_dir, tmp_path):
    # The demo's data step (the demo itself is tested end to end in test_demo.py).
    out = tmp_path / "prepared"
    args = ["prepare", str(lits117_dir), "--out", str(out), "--size", "32", "--z-split", "0.6,0.2,0.2"]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["demo_z_split"] is True and manifest["options"]["slices"] == "tumor"
    assert [c["id"] for c in manifest["cases"]] == ["lits-117-z:train", "lits-117-z:val", "lits-117-z:test"]
    # 123 axial tumour slices (z 5..127) cut into 69/25/25-slice blocks with two gaps of 2K + 2 = 2 slices
    assert manifest["n_slices"] == 119
    assert "not a patient-level split" in manifest["options"]["z_split"]["note"]
    assert CliRunner().invoke(app, [*args, "--no-progress"]).exit_code == 1  # refuses to overwrite
    assert CliRunner().invoke(app, [*args, "--no-progress", "--overwrite"]).exit_code == 0
