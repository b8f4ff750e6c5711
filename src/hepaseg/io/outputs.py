"""Output paths: checked before any work, and replaced only when hepaseg wrote them.

Every folder a command creates (``prepare``, a ``train`` run, ``evaluate``, ``compare``,
``crossval``, ``demo``, ``predict``) carries a marker file :data:`OUTPUT_MARKER`::

    {"format": "hepaseg-output/1", "command": "predict", "hepaseg_version": "0.1.0"}

:func:`check_output_dir` is called by each command's library function before it reads or
computes anything. It refuses, with one line naming the option:

* an output equal to, inside, or containing one of the command's inputs (symlinks resolved),
  so that replacing the output can never delete or change an input;
* a path that cannot be written: a file where a folder must go, a read-only parent;
* an existing, non-empty folder without the marker (someone else's files, or an output of
  a hepaseg version before the marker: the user deletes or moves it), or with the marker of
  another command;
* an earlier output of the same command unless the caller may replace (``--overwrite``) or
  continue (resume, re-evaluate) it.

:func:`check_output_file` does the same for single-file outputs (``--onnx``, an explain PNG,
a benchmark JSON).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hepaseg import __version__
from hepaseg.errors import HepasegError
from hepaseg.io.atomic import write_json_atomic

__all__ = [
    "OUTPUT_MARKER",
    "check_apart_from_inputs",
    "check_output_dir",
    "check_output_file",
    "check_writable",
    "read_output_marker",
    "write_output_marker",
]

OUTPUT_MARKER = ".hepaseg-output.json"
MARKER_FORMAT = "hepaseg-output/1"
# Markers of earlier hepaseg versions that name their command unambiguously.
_LEGACY_MARKERS = {".hepaseg-demo": "demo"}

PathLike = str | os.PathLike


def write_output_marker(folder: PathLike, command: str) -> Path:
    """Write :data:`OUTPUT_MARKER` into ``folder`` (atomically) and return its path."""
    return write_json_atomic(
        Path(folder) / OUTPUT_MARKER, {"format": MARKER_FORMAT, "command": command, "hepaseg_version": __version__}
    )


def read_output_marker(folder: PathLike) -> dict[str, Any] | None:
    """The marker of ``folder`` (``{"command": ..., ...}``), or None when it has none (or an unreadable one)."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT and isinstance(marker.get("command"), str):
        return marker
    for name, command in _LEGACY_MARKERS.items():
        if (folder / name).is_file():
            return {"format": name, "command": command}
    return None


def _resolved(path: PathLike) -> Path:
    # strict=False: the output usually does not exist yet; its existing ancestors' links are still resolved.
    return Path(os.path.abspath(Path(path).expanduser())).resolve(strict=False)


def check_apart_from_inputs(out: PathLike, option: str, inputs: Iterable[PathLike | None]) -> None:
    """Refuse an output equal to, inside, or containing one of ``inputs`` (symlinks resolved)."""
    target = _resolved(out)
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "is inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise HepasegError(
            f"{out}: {option} {relation} the input {given}: expected an output apart from every input "
            f"(an output may be replaced; an input must never be). Choose a path outside {given} for {option}"
        )


def check_writable(out: PathLike, option: str) -> None:
    """Refuse an output path that cannot be written: a file where a folder must go, a read-only folder.

    The nearest existing ancestor of ``out`` must be a writable folder; when ``out`` exists, its
    parent must be writable (outputs are renamed into place beside it), and ``out`` too if it is
    a folder.
    """
    out = Path(out)
    absolute = Path(os.path.abspath(out.expanduser()))
    existing = absolute
    for existing in (absolute, *absolute.parents):
        if existing.exists():
            break
        if existing.is_symlink():  # a dangling link: mkdir would fail
            raise HepasegError(f"{out}: {option}: {existing} is a broken symbolic link: expected a folder. "
                               f"Choose another {option}")
    if existing != absolute and not existing.is_dir():
        raise HepasegError(f"{out}: {option}: {existing} is a file, not a folder: expected a path whose parents "
                           f"are folders. Choose another {option}")
    if existing != absolute:
        places = [existing]
    else:
        places = [absolute.parent, absolute] if absolute.is_dir() else [absolute.parent]
    for place in places:
        if not os.access(place, os.W_OK | os.X_OK):
            raise HepasegError(f"{out}: {option}: cannot write in {place} (permission denied or read-only): "
                               f"expected a writable folder. Choose another {option} or fix the permissions")


def check_output_dir(
    out: PathLike,
    *,
    command: str,
    option: str = "--out",
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    reuse: bool = False,
) -> str:
    """Check an output folder before any work; return ``"new"`` or ``"own"``.

    Args:
        out: the output folder.
        command: the hepaseg command writing it (``"predict"``); an existing folder must carry
            this command's marker.
        option: the option that named ``out``, for the message (default ``--out``).
        inputs: the command's input files/folders (``None`` entries are skipped).
        overwrite: an earlier output of ``command`` may be replaced (``--overwrite``).
        reuse: an earlier output of ``command`` may be continued or updated in place (resume,
            re-evaluation into the same folder).

    Returns:
        ``"new"`` when ``out`` is absent or an empty folder, ``"own"`` when it holds an earlier
        output of ``command`` that the caller may replace or continue.

    Raises:
        HepasegError: one line, naming ``out`` and ``option`` (see the module docstring).
    """
    out = Path(out)
    check_apart_from_inputs(out, option, inputs)
    if out.exists() and not out.is_dir():
        raise HepasegError(f"{out}: {option} exists and is a file: expected a folder (new, empty, or an earlier "
                           f"`hepaseg {command}` output). Choose another {option}")
    check_writable(out, option)
    if not out.is_dir():
        return "new"
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return "new"
    marker = read_output_marker(out)
    if marker is None:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise HepasegError(
            f"{out}: {option} holds files hepaseg did not write ({shown}; no {OUTPUT_MARKER} marker): expected a "
            f"new or empty folder. hepaseg replaces only its own outputs: delete or move this folder yourself, or "
            f"choose another {option}; nothing was written"
        )
    if marker["command"] != command:
        raise HepasegError(
            f"{out}: {option} holds the output of `hepaseg {marker['command']}`: expected a new or empty folder or "
            f"an earlier `hepaseg {command}` output. Choose another {option}; nothing was written"
        )
    if not (overwrite or reuse):
        raise HepasegError(
            f"{out}: {option} already holds an earlier `hepaseg {command}` output: expected a new or empty folder. "
            f"Pass --overwrite to replace it, or choose another {option}; nothing was written"
        )
    return "own"


def check_output_file(
    path: PathLike,
    *,
    option: str,
    inputs: Iterable[PathLike | None] = (),
    suffix: str | None = None,
) -> None:
    """Check a single-file output before any work: not an input or inside one, not a folder, writable.

    An existing file is replaced when the command finishes (atomically); callers that must not
    replace a foreign file check that themselves.

    Raises:
        HepasegError: one line naming ``path`` and ``option``.
    """
    path = Path(path)
    if suffix is not None and not path.name.lower().endswith(suffix):
        raise HepasegError(f"{option}: {path}: expected a {suffix} file name, got suffix {path.suffix or 'none'!r}. "
                           f"Name a {suffix} file")
    check_apart_from_inputs(path, option, inputs)
    if path.is_dir():
        raise HepasegError(f"{path}: {option} is an existing folder: expected a file name. "
                           f"Name a file, e.g. {path / ('out' + (suffix or ''))}")
    check_writable(path, option)
