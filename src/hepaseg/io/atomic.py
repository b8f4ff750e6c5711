"""Write-then-rename helpers so that no output is ever half-written.

A file is written under a temporary name in the same directory and moved into
place with :func:`os.replace` (atomic on POSIX) only once it is complete; on any
exception the temporary is removed and the destination is left untouched.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_dir", "replace_dir", "write_csv_atomic", "write_json_atomic", "write_text_atomic"]


def _umask() -> int:
    # os.umask can only be read by setting it; restore at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    ``suffix`` defaults to the destination's full suffix (``.nii.gz`` stays
    ``.nii.gz``) because some writers choose the format from the file name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; outputs should get the user's normal permissions.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it onto ``path`` on success (:func:`replace_dir`).

    ``path`` may be absent, an empty folder, or an earlier output that the caller has decided to
    replace (see :func:`hepaseg.io.outputs.check_output_dir`). The temporary directory gets the
    user's normal permissions (not mkdtemp's 0700) and is removed on any exception, SIGTERM
    included when a handler turns it into one (the CLI installs such a handler).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp_path, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp_path
        replace_dir(tmp_path, path)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise


@contextlib.contextmanager
def _termination_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT until the block ends, so a swap of two folders is never cut in half.

    The signals are recorded by a temporary handler and raised again afterwards, reaching the
    previous handler (blocking with a signal mask would not do: Python runs its handlers in the
    main thread whichever thread the signal reaches, and torch starts threads).
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    held: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum in previous:
        signal.signal(signum, lambda received, frame: held.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in held:
            signal.raise_signal(signum)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move a finished directory ``tmp`` onto ``out`` (same file system).

    An empty ``out`` is removed first; a non-empty one (a previous output the caller decided to
    replace) is renamed aside and deleted only after ``tmp`` is in place, and put back if that
    rename fails, so ``out`` is never left half-written or missing. SIGTERM/SIGINT are held
    until the swap is over. Callers check that ``out`` is theirs to replace first.
    """
    tmp, out = Path(tmp), Path(out)
    with _termination_deferred():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.replace(tmp, out)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically and return the path."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_csv_atomic(path: str | os.PathLike, rows: list[dict[str, Any]], fields: Sequence[str]) -> Path:
    """Write ``rows`` as CSV with the columns ``fields`` to ``path`` atomically and return the path.

    Missing columns are left empty and extra keys ignored; a NaN float is written as an empty cell and
    other floats with ``repr`` (every digit, so a table read back compares equal).
    """
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), restval="", extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({
                k: ("" if isinstance(v, float) and math.isnan(v) else repr(v) if isinstance(v, float) else v)
                for k, v in row.items()
            })
    return Path(path)


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and paths appear in manifests and metrics.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
