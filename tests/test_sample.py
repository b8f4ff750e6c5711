"""LiTS-117 sample fetcher: copy or (mocked) pip download, sha256 check, NIfTI conversion, caching. No network."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mrcfile
import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from hepaseg.cli import app
from hepaseg.data.sample import LITS117_SHA256, fetch_lits117
from hepaseg.errors import HepasegError

sample_mod = importlib.import_module("hepaseg.data.sample")
MEMBERS = ("img_117.mrc", "lab_117.mrc")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_mrc(tmp_path, monkeypatch) -> Path:
    """A small synthetic img/lab pair, with the expected checksums patched to match it."""
    folder = tmp_path / "mrc"
    folder.mkdir()
    rng = np.random.default_rng(0)
    image = rng.normal(0, 100, size=(6, 8, 10)).astype(np.float32)
    label = np.zeros((6, 8, 10), np.uint16)
    label[2:4, 3:6, 4:8] = 1
    label[3, 4, 5] = 2
    with mrcfile.new(folder / "img_117.mrc") as m:
        m.set_data(image)
    with mrcfile.new(folder / "lab_117.mrc") as m:
        m.set_data(label)
    monkeypatch.setattr(sample_mod, "LITS117_SHA256", {name: _sha(folder / name) for name in MEMBERS})
    return folder


def _fake_wheel(wheel: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"liver_ct_segmentation_package/data/{name}", data)
        zf.writestr("liver_ct_segmentation_package-1.6.0.dist-info/LICENSE", "MIT License (fake)")


def _check_conversion(dest: Path, src: Path) -> None:
    with mrcfile.open(src / "img_117.mrc") as m:
        image = np.array(m.data)
    with mrcfile.open(src / "lab_117.mrc") as m:
        label = np.array(m.data)
    vol, seg = nib.load(dest / "volume-117.nii.gz"), nib.load(dest / "segmentation-117.nii.gz")
    np.testing.assert_allclose(vol.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))  # nominal 1 mm, canonical LPS
    # The MRC arrays are (x, y, z) of the scan, as NIfTI stores voxels: the last axis (axial) is NIfTI's z.
    np.testing.assert_array_equal(np.asarray(vol.dataobj), image)
    seg_data = np.asarray(seg.dataobj)
    assert seg_data.dtype == np.uint8
    np.testing.assert_array_equal(seg_data, label)
    info = json.loads((dest / "sample.json").read_text())
    assert "nominal 1 mm" in info["spacing_note"] and info["case"] == "lits-117"


def test_from_dir_converts_and_is_cached(tiny_mrc, tmp_path, monkeypatch):
    dest = fetch_lits117(tmp_path / "dest", from_dir=tiny_mrc)
    assert dest == tmp_path / "dest"
    _check_conversion(dest, tiny_mrc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "mrc"]  # no staging dir left
    # a verified conversion is not redone (no copy is even attempted)
    monkeypatch.setattr(sample_mod, "_copy_from", lambda *a: pytest.fail("re-fetched a cached sample"))
    stamp = (dest / "volume-117.nii.gz").stat().st_mtime_ns
    fetch_lits117(dest, from_dir=tiny_mrc)
    assert (dest / "volume-117.nii.gz").stat().st_mtime_ns == stamp


def test_tampered_output_is_redone(tiny_mrc, tmp_path):
    dest = fetch_lits117(tmp_path / "dest", from_dir=tiny_mrc)
    (dest / "segmentation-117.nii.gz").write_bytes(b"garbage")
    fetch_lits117(dest, from_dir=tiny_mrc)
    _check_conversion(dest, tiny_mrc)


def test_checksum_mismatch_is_an_error(tiny_mrc, tmp_path):
    data = bytearray((tiny_mrc / "lab_117.mrc").read_bytes())
    data[-1] ^= 0xFF
    (tiny_mrc / "lab_117.mrc").write_bytes(bytes(data))
    with pytest.raises(HepasegError, match="sha256 mismatch for lab_117.mrc"):
        fetch_lits117(tmp_path / "dest", from_dir=tiny_mrc)
    assert not (tmp_path / "dest").exists()


def test_from_dir_missing_file(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(HepasegError, match="img_117.mrc"):
        fetch_lits117(tmp_path / "dest", from_dir=tmp_path / "half")


def test_download_path_runs_pip_download_and_extracts(tiny_mrc, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]) / "liver_ct_segmentation_package-1.6.0-py3-none-any.whl",
                    {n: (tiny_mrc / n).read_bytes() for n in MEMBERS})  # fmt: skip
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sample_mod.subprocess, "run", fake_run)
    dest = fetch_lits117(tmp_path / "dest", cache_dir=cache)
    assert calls == [
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-d",
            str(cache),
            "liver-ct-segmentation-package==1.6.0",
        ]
    ]
    _check_conversion(dest, tiny_mrc)
    assert (dest / "LICENSE").read_text() == "MIT License (fake)"
    # the wheel stays in the cache: a second fetch into a new folder does not call pip again
    fetch_lits117(tmp_path / "dest2", cache_dir=cache)
    assert len(calls) == 1 and (tmp_path / "dest2" / "volume-117.nii.gz").is_file()


def test_download_wrong_content_and_pip_failure(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]) / "liver_ct_segmentation_package-1.6.0-py3-none-any.whl",
                    {n: b"not the sample" for n in MEMBERS})  # fmt: skip
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sample_mod.subprocess, "run", fake_run)
    with pytest.raises(HepasegError, match="sha256 mismatch"):
        fetch_lits117(tmp_path / "dest", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "dest").exists()

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(sample_mod.subprocess, "run", offline)
    with pytest.raises(HepasegError, match="--from-dir"):
        fetch_lits117(tmp_path / "dest", cache_dir=tmp_path / "empty-cache")


def test_cli_sample_unknown_name(tmp_path):
    result = CliRunner().invoke(app, ["sample", "lits999", "--dest", str(tmp_path / "d")])
    assert result.exit_code == 1 and "lits117" in result.output


@pytest.mark.realdata
def test_real_sample_from_dir(lits117_dir, tmp_path):
    assert {n: _sha(lits117_dir / n) for n in MEMBERS} == LITS117_SHA256
    result = CliRunner().invoke(
        app, ["sample", "lits117", "--dest", str(tmp_path / "s"), "--from-dir", str(lits117_dir)]
    )
    assert result.exit_code == 0, result.output
    _check_conversion(tmp_path / "s", lits117_dir)
    from hepaseg.io import read_volume

    vol = read_volume(tmp_path / "s" / "volume-117.nii.gz")
    assert vol.case_id == "lits-117" and vol.shape == (128, 128, 128)
    assert int((vol.label == 2).any(axis=(1, 2)).sum()) == 123  # tumour in 123 axial slices
    assert np.bincount(vol.label.ravel()).tolist() == [1481801, 485268, 130083]


@pytest.mark.realdata
def test_real_sample_corrupted_copy(lits117_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copyfile(lits117_dir / "lab_117.mrc", bad / "lab_117.mrc")
    data = bytearray((lits117_dir / "img_117.mrc").read_bytes())
    data[5000] ^= 0x01
    (bad / "img_117.mrc").write_bytes(bytes(data))
    with pytest.raises(HepasegError, match=f"expected {LITS117_SHA256['img_117.mrc']}"):
        fetch_lits117(tmp_path / "dest", from_dir=bad)
    assert not (tmp_path / "dest").exists()
