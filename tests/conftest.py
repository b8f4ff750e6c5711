"""Shared fixtures.

``shared_data``: the real CT in ``../shared/data`` (3D-IRCADb 1.1, LiTS-117).
Tests that use it are marked ``realdata``; outside CI they skip with a visible
reason when the folder is absent, under ``CI=true`` its absence fails the test.
Caches (matplotlib, torch inductor) are pointed into a per-session temp dir so
that tests never write outside their tmp paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HEPASEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_configure(config):
    import tempfile

    cache = Path(tempfile.mkdtemp(prefix="hepaseg-test-cache-"))
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "mpl"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ``../shared/data``; skip (or fail under CI=true) when it is absent."""
    if not (SHARED_DATA / "3Dircadb1.1").is_dir() or not (SHARED_DATA / "lits117").is_dir():
        msg = f"real CT data not found at {SHARED_DATA} (needs 3Dircadb1.1/ and lits117/)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " -- required under CI=true")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def ircadb_dir(shared_data: Path) -> Path:
    return shared_data / "3Dircadb1.1"


@pytest.fixture(scope="session")
def lits117_dir(shared_data: Path) -> Path:
    return shared_data / "lits117"
