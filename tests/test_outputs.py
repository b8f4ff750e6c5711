"""io.outputs: output paths are checked before any work; only hepaseg's own outputs are replaced."""

from __future__ import annotations

import json
import os

import pytest

from hepaseg.errors import HepasegError
from hepaseg.io import atomic as atomic_module
from hepaseg.io import outputs as outputs_module
from hepaseg.io.atomic import atomic_dir
from hepaseg.io.outputs import (
    OUTPUT_MARKER,
    check_output_dir,
    check_output_file,
    read_output_marker,
    write_output_marker,
)


def test_states_new_own_and_the_refusals(tmp_path):
    out = tmp_path / "out"
    assert check_output_dir(out, command="predict") == "new"
    out.mkdir()
    assert check_output_dir(out, command="predict") == "new"  # empty
    write_output_marker(out, "predict")
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["command"] == "predict" and marker["format"] == "hepaseg-output/1" and read_output_marker(out)
    with pytest.raises(HepasegError, match=r"out: --out already holds an earlier `hepaseg predict` output"):
        check_output_dir(out, command="predict")
    assert check_output_dir(out, command="predict", overwrite=True) == "own"
    assert check_output_dir(out, command="predict", reuse=True) == "own"
    with pytest.raises(HepasegError, match=r"holds the output of `hepaseg predict`: expected .*`hepaseg train`"):
        check_output_dir(out, command="train", overwrite=True)
    (out / OUTPUT_MARKER).write_text("{not json")  # a damaged marker is no marker
    with pytest.raises(HepasegError, match=r"hepaseg did not write .*no \.hepaseg-output\.json marker.*delete or move"):
        check_output_dir(out, command="predict", overwrite=True)


def test_legacy_demo_marker_is_the_demo_command(tmp_path):
    (tmp_path / ".hepaseg-demo").write_text("{}")
    assert read_output_marker(tmp_path)["command"] == "demo"
    assert check_output_dir(tmp_path, command="demo", overwrite=True) == "own"


def test_overlap_with_inputs_through_symlinks(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "scan.nii.gz").write_bytes(b"x")
    alias = tmp_path / "alias"
    alias.symlink_to(data)
    cases = [(data, "is"), (alias, "is"), (data / "sub", "is inside"), (alias / "sub", "is inside"),
             (tmp_path, "contains")]
    for out, relation in cases:
        with pytest.raises(HepasegError, match=rf"--out {relation} the input"):
            check_output_dir(out, command="predict", inputs=[data / "scan.nii.gz" if relation == "contains" else data])
    assert check_output_dir(tmp_path / "elsewhere", command="predict", inputs=[data, None]) == "new"
    with pytest.raises(HepasegError, match=r"--onnx is the input"):
        check_output_file(alias / "scan.nii.gz", option="--onnx", inputs=[data / "scan.nii.gz"])


def test_unwritable_and_impossible_paths(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(HepasegError, match=r"afile/out: --out: .*afile is a file, not a folder"):
        check_output_dir(tmp_path / "afile" / "out", command="prepare")
    with pytest.raises(HepasegError, match=r"afile: --out exists and is a file"):
        check_output_dir(tmp_path / "afile", command="prepare")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(HepasegError, match=r"broken symbolic link"):
        check_output_dir(tmp_path / "dangling" / "out", command="prepare")
    with pytest.raises(HepasegError, match=r"--onnx is an existing folder"):
        check_output_file(tmp_path, option="--onnx")
    with pytest.raises(HepasegError, match=r"--out: .*expected a \.png file name"):
        check_output_file(tmp_path / "f.jpg", option="--out", suffix=".png")
    # A read-only folder (root may write anyway, so os.access is what decides, as for the commands).
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(outputs_module.os, "access",
                        lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    with pytest.raises(HepasegError, match=r"ro/deep/out: --out: cannot write in .*ro \(permission denied"):
        check_output_dir(ro / "deep" / "out", command="prepare")
    with pytest.raises(HepasegError, match=r"cannot write in"):
        check_output_file(ro / "f.png", option="--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder; the os.access path is "
                    "tested above with the check patched")
def test_read_only_folder_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(HepasegError, match="cannot write in"):
            check_output_dir(ro / "out", command="prepare")
    finally:
        ro.chmod(0o755)


def test_atomic_dir_replaces_an_earlier_output_whole_and_keeps_normal_permissions(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("stopped")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_holds_sigterm_until_the_swap_is_done(tmp_path, monkeypatch):
    import signal

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("previous")
    new = tmp_path / "new"
    new.mkdir()
    (new / "f").write_text("new")
    seen = []
    real_replace = os.replace

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        if not seen:  # SIGTERM right after `out` was moved aside: it must wait for the swap
            seen.append(dst)
            os.kill(os.getpid(), signal.SIGTERM)

    class Stopped(Exception):
        pass

    def handler(signum, frame):
        raise Stopped

    previous = signal.signal(signal.SIGTERM, handler)
    monkeypatch.setattr(atomic_module.os, "replace", replace_then_signal)
    try:
        with pytest.raises(Stopped):
            atomic_module.replace_dir(new, out)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(seen) == 1  # the signal arrived mid-swap, and was held until the swap was done:
    assert sorted(p.name for p in out.iterdir()) == ["f"]  # the swap finished before the handler ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and the old copy was removed
