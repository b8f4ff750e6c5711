"""Claim files: several workers (cluster array tasks, local processes) share one output folder.

A worker that wants run ``R`` creates ``CLAIMS/R.<gen>.claim`` with ``O_CREAT | O_EXCL``, which
the file system lets exactly one creator win (POSIX; NFS v3+ too). The file holds the owner's
host, pid and start time; its modification time is the owner's heartbeat, refreshed by a
background thread every ``heartbeat_s`` seconds while the run lasts.

A claim is **stale** when its owner is on this host and the pid no longer exists, or when its
heartbeat is older than ``stale_after_s`` (an owner on another host that died, or a frozen one).
A stale claim is taken over by creating the NEXT generation ``R.<gen + 1>.claim``, again with
``O_EXCL``: of two workers that both judged generation ``g`` stale, one wins ``g + 1``, the other
sees it and backs off. The highest generation is the claim in force; an owner whose claim was
superseded learns it from :meth:`Claim.still_owned` and must not publish its result.

The claims only arbitrate who runs what; whether a run is finished is the caller's own marker
file (written atomically, last), so a worker killed mid-run leaves a run without a marker and a
claim that turns stale: the next worker takes it over and resumes the run from its checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "Claim", "claim_owner", "run_claimed", "try_claim"]

#: Seconds between two heartbeats of a running claim.
HEARTBEAT_S = 30.0
#: A claim whose heartbeat is older than this (seconds) is stale, whatever host it is on.
STALE_AFTER_S = 600.0

_NAME = re.compile(r"^(?P<run>.+)\.(?P<gen>\d+)\.claim$")


def _safe(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id)


def _generations(folder: Path, run_id: str) -> list[tuple[int, Path]]:
    """``[(gen, path)]`` of ``run_id``'s claim files, highest generation first."""
    stem = _safe(run_id)
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            m = _NAME.match(path.name)
            if m and m.group("run") == stem:
                found.append((int(m.group("gen")), path))
    return sorted(found, reverse=True)


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        info["heartbeat"] = path.stat().st_mtime
        return info
    except (OSError, ValueError):  # vanished, or caught between create and write: not ours to judge yet
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _is_stale(info: dict | None, path: Path, stale_after_s: float, now: float) -> bool:
    if info is None:
        # Unreadable: a claim being written right now is fresh; one that stays empty goes stale by age.
        try:
            return now - path.stat().st_mtime > stale_after_s
        except OSError:
            return False
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
        return True
    return now - float(info["heartbeat"]) > stale_after_s


def claim_owner(folder: str | os.PathLike, run_id: str, *, stale_after_s: float = STALE_AFTER_S) -> dict | None:
    """The live claim of ``run_id`` (``host``, ``pid``, ``started``, ``heartbeat``, ``gen``), or None."""
    gens = _generations(Path(folder), run_id)
    if not gens:
        return None
    gen, path = gens[0]
    info = _read(path)
    if _is_stale(info, path, stale_after_s, time.time()):
        return None
    return {**(info or {}), "gen": gen}


@dataclass
class Claim:
    """A claim this process holds; release it (or use it as a context manager) when the run ends."""

    folder: Path
    run_id: str
    gen: int
    path: Path
    took_over: dict | None = None  # the stale claim it replaced, if any
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None

    def start_heartbeat(self, interval_s: float = HEARTBEAT_S) -> None:
        """Refresh the claim's modification time every ``interval_s`` seconds in a daemon thread."""
        self._stop = threading.Event()

        def beat(stop: threading.Event = self._stop) -> None:
            while not stop.wait(interval_s):
                try:
                    os.utime(self.path)
                except OSError:  # removed (superseded and cleaned up): nothing left to refresh
                    return

        self._thread = threading.Thread(target=beat, name=f"heartbeat {self.run_id}", daemon=True)
        self._thread.start()

    def still_owned(self) -> bool:
        """True while no later generation has taken this run over."""
        gens = _generations(self.folder, self.run_id)
        return bool(gens) and gens[0][0] == self.gen and self.path.exists()

    def release(self) -> None:
        """Stop the heartbeat and remove this claim's file (and older generations of the run)."""
        if self._stop is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
        for gen, path in _generations(self.folder, self.run_id):
            if gen <= self.gen:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def try_claim(
    folder: str | os.PathLike,
    run_id: str,
    *,
    stale_after_s: float = STALE_AFTER_S,
    heartbeat_s: float | None = HEARTBEAT_S,
) -> Claim | None:
    """Claim ``run_id`` for this process, taking over a stale claim; None when a live worker holds it.

    Args:
        folder: the claims folder (created), shared by every worker of the output folder.
        run_id: the run's name (any text; stored under a file-system safe form).
        stale_after_s: heartbeat age (s) after which another host's claim counts as abandoned.
        heartbeat_s: start a heartbeat thread with this interval; None: no thread (the caller
            refreshes, or the claim is short-lived).

    Returns:
        The :class:`Claim`, or None.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = _safe(run_id)
    gens = _generations(folder, run_id)
    took_over = None
    gen = 0
    if gens:
        gen, path = gens[0]
        info = _read(path)
        if not _is_stale(info, path, stale_after_s, time.time()):
            return None
        took_over = {**(info or {}), "gen": gen}
        gen += 1
    path = folder / f"{stem}.{gen}.claim"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None  # another worker created this generation a moment ago: it holds the run
    with os.fdopen(fd, "w") as fh:
        json.dump({"run": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                   **({"took_over": took_over} if took_over else {})}, fh)
    claim = Claim(folder=folder, run_id=run_id, gen=gen, path=path, took_over=took_over)
    if heartbeat_s is not None:
        claim.start_heartbeat(heartbeat_s)
    return claim


# --- running a plan -------------------------------------------------------------------------------


def run_claimed(
    folder: str | os.PathLike,
    run_id: str,
    is_done: Callable[[], bool],
    work: Callable[[Claim], None],
    *,
    wait: bool,
    poll_s: float = 5.0,
    stale_after_s: float = STALE_AFTER_S,
    log: Callable[[str], None] | None = None,
) -> str:
    """Run ``work(claim)`` for ``run_id`` unless it is done or held by a live worker.

    ``work`` must publish its result (the marker ``is_done`` looks for) only while
    ``claim.still_owned()``. With ``wait``, a run held by another live worker is waited for
    (polling every ``poll_s`` s) until it is done or its claim goes stale and is taken over.

    Returns:
        ``"done"`` (finished before), ``"ran"`` (this call ran it), or ``"held"`` (a live worker
        holds it; only without ``wait``).
    """
    say = log or (lambda _msg: None)
    announced = False
    while True:
        if is_done():
            return "done"
        claim = try_claim(folder, run_id, stale_after_s=stale_after_s)
        if claim is not None:
            with claim:
                if is_done():  # finished by the previous owner between our check and our claim
                    return "done"
                if claim.took_over:
                    t = claim.took_over
                    say(f"{run_id}: taking over from {t.get('host')}:{t.get('pid')} (its claim went stale); "
                        "resuming")
                work(claim)
            return "ran"
        if not wait:
            return "held"
        if not announced:
            owner = claim_owner(folder, run_id, stale_after_s=stale_after_s) or {}
            say(f"{run_id}: held by {owner.get('host')}:{owner.get('pid')}; waiting for it")
            announced = True
        time.sleep(poll_s)
