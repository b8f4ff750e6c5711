"""Write-then-rename helpers: nothing is ever half-written or lost."""

from __future__ import annotations

import os

import pytest

from hepaseg.io import atomic as atomic_module
from hepaseg.io.atomic import atomic_path, replace_dir, write_json_atomic


def make_dir(path, name, text):
    path.mkdir()
    (path / name).write_text(text)
    return path


def test_replace_dir_into_absent_empty_and_previous(tmp_path):
    out = tmp_path / "out"
    replace_dir(make_dir(tmp_path / "a", "f", "1"), out)
    assert (out / "f").read_text() == "1"
    replace_dir(make_dir(tmp_path / "b", "g", "2"), out)  # a previous output is replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["g"]
    empty = tmp_path / "empty"
    empty.mkdir()
    replace_dir(make_dir(tmp_path / "c", "h", "3"), empty)
    assert (empty / "h").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no .old or temp left


def test_replace_dir_puts_the_previous_output_back_when_the_rename_fails(tmp_path, monkeypatch):
    out = make_dir(tmp_path / "out", "old", "previous")
    new = make_dir(tmp_path / "new", "f", "new")
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # out -> .old succeeded; new -> out fails
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        replace_dir(new, out)
    assert (out / "old").read_text() == "previous"
    assert (new / "f").read_text() == "new"  # the caller still owns its temp dir


def test_atomic_path_leaves_nothing_on_error_and_keeps_normal_permissions(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("keep")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    umask = os.umask(0)
    os.umask(umask)
    write_json_atomic(tmp_path / "n.json", {"a": 1})
    assert (tmp_path / "n.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
