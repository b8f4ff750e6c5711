"""Fetch the LiTS-117 sample case and store it as NIfTI in the LiTS layout (``hepaseg sample``).

LiTS training case 117 (= MSD Task03 ``liver_117``), resampled and cropped to
128 x 128 x 128, ships as two MRC files inside the MIT-licensed PyPI wheel
``liver-ct-segmentation-package==1.6.0`` (``liver_ct_segmentation_package/data/
img_117.mrc`` float32 HU and ``lab_117.mrc`` uint16 {0, 1, 2}). We fetch the
wheel with ``pip download --no-deps`` (never ``pip install``: that package pins
torch 1.7.1), take the two files out of it with :mod:`zipfile`, check their
sha256 and write::

    DEST/volume-117.nii.gz        float32 HU, (x, y, z) on disk, affine diag(-1, -1, 1) (1 mm, LPS)
    DEST/segmentation-117.nii.gz  uint8 {0 background, 1 liver, 2 tumour}
    DEST/sample.json              provenance, nominal-spacing note, sha256 of inputs and outputs
    DEST/LICENSE                  the package's licence, when it ships one

The MRC header carries no voxel size, so the spacing is a NOMINAL 1 mm
isotropic (volumes and distances in mm/mL are therefore not physical). The MRC
arrays are indexed (x, y, z) of the original scan, so their LAST axis is the axial one
(tumour in 123 axial slices): the NIfTI is written from :func:`hepaseg.io.read_volume`'s
axial ``(z, y, x)`` arrays with the canonical LPS affine, so a viewer shows axial slices
with the liver on the image's left and the spine at the bottom.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hepaseg.errors import HepasegError
from hepaseg.io import read_volume, write_image_nifti, write_label_nifti
from hepaseg.io.atomic import write_json_atomic
from hepaseg.io.outputs import check_apart_from_inputs, check_writable

__all__ = ["LITS117_PACKAGE", "LITS117_SHA256", "SAMPLES", "default_cache_dir", "fetch_lits117"]

LITS117_PACKAGE = "liver-ct-segmentation-package==1.6.0"
_WHEEL_GLOB = "liver_ct_segmentation_package-1.6.0-*.whl"
_MEMBER_DIR = "liver_ct_segmentation_package/data/"
#: sha256 of the two MRC files as shipped in the 1.6.0 wheel.
LITS117_SHA256 = {
    "img_117.mrc": "6519548844be8c92a6f37dff22961800ec4baad72a4efbb9f7061ffd265e1780",
    "lab_117.mrc": "0f4950afdb218ae1a8790c2367a3f1bffe3d68cf186239cdfae897e4d4f99240",
}
_OUTPUTS = {"img_117.mrc": "volume-117.nii.gz", "lab_117.mrc": "segmentation-117.nii.gz"}
#: Names ``hepaseg sample`` accepts.
SAMPLES = ("lits117",)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hepaseg`` or ``~/.cache/hepaseg``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hepaseg"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected: str, origin: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise HepasegError(
            f"{origin}: sha256 mismatch for {path.name}: expected {expected}, got {got}. "
            "The file is corrupt or not the LiTS-117 sample; delete it and fetch again."
        )


def _is_complete(dest: Path) -> bool:
    """True when ``dest`` already holds the converted sample whose checksums still match."""
    info_path = dest / "sample.json"
    try:
        info = json.loads(info_path.read_text())
        outputs = info["outputs_sha256"]
        return all(_sha256(dest / name) == outputs[name] for name in _OUTPUTS.values())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _download_wheel(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(_WHEEL_GLOB))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), LITS117_PACKAGE]
    try:
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    except OSError as exc:
        raise HepasegError(
            f"pip download: cannot run {cmd[0]} -m pip ({exc}). Use --from-dir with a copy."
        ) from None
    found = sorted(cache.glob(_WHEEL_GLOB))
    if result.returncode != 0 or not found:
        tail = " ".join((result.stderr or result.stdout or "").strip().splitlines()[-2:])
        raise HepasegError(
            f"pip download {LITS117_PACKAGE}: failed (exit {result.returncode}): expected a wheel "
            f"{_WHEEL_GLOB} in {cache}, got none. {tail} No network? Copy img_117.mrc and lab_117.mrc "
            "from a machine that has them and pass --from-dir."
        )
    return found[0]


def _extract(wheel: Path, staging: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for mrc in LITS117_SHA256:
                member = _MEMBER_DIR + mrc
                if member not in names:
                    raise HepasegError(
                        f"{wheel}: wheel has no {member}: expected the {LITS117_PACKAGE} wheel. "
                        "Delete it from the cache and fetch again."
                    )
                with zf.open(member) as src, open(staging / mrc, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            licences = [n for n in names if n.endswith((".dist-info/LICENSE", "/licenses/LICENSE"))]
            if licences:
                with zf.open(licences[0]) as src, open(staging / "LICENSE", "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        raise HepasegError(
            f"{wheel}: not a valid wheel (zip): delete it from the cache and fetch again."
        ) from None
    return staging


def _copy_from(from_dir: Path, staging: Path) -> None:
    for mrc in LITS117_SHA256:
        src = from_dir / mrc
        if not src.is_file():
            raise HepasegError(
                f"{src}: not found: expected img_117.mrc and lab_117.mrc in --from-dir {from_dir}."
            )
        shutil.copyfile(src, staging / mrc)
    if (from_dir / "LICENSE").is_file():
        shutil.copyfile(from_dir / "LICENSE", staging / "LICENSE")


def fetch_lits117(
    dest_dir: str | os.PathLike,
    *,
    from_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Get the LiTS-117 sample into ``dest_dir`` as ``volume-117.nii.gz`` + ``segmentation-117.nii.gz``.

    Args:
        dest_dir: output folder (created); if it already holds a verified
            conversion (``sample.json`` checksums match) nothing is done.
        from_dir: a folder holding ``img_117.mrc`` and ``lab_117.mrc`` (e.g. an
            offline copy); when given, nothing is downloaded.
        cache_dir: where ``pip download`` puts the wheel (default
            :func:`default_cache_dir`); a wheel already there is reused.

    Returns:
        ``Path(dest_dir)``.

    Raises:
        HepasegError: download failure, missing files, or a sha256 mismatch
            (nothing is written to ``dest_dir`` then).
    """
    dest = Path(dest_dir)
    if dest.exists() and not dest.is_dir():
        raise HepasegError(
            f"{dest}: --dest exists and is a file: expected a directory. Choose another --dest."
        )
    check_apart_from_inputs(dest, "--dest", [from_dir])  # the MRC files are never written over
    check_writable(dest, "--dest")
    if _is_complete(dest):
        return dest
    # Stage beside dest, so a failed fetch or checksum leaves dest untouched (not even created).
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent) as tmp:
        staging = Path(tmp)
        if from_dir is not None:
            origin = Path(from_dir)
            if not origin.is_dir():
                raise HepasegError(
                    f"{origin}: --from-dir not found: expected a folder with img_117.mrc and lab_117.mrc."
                )
            _copy_from(origin, staging)
            provenance = f"copied from {origin}"
        else:
            wheel = _download_wheel(Path(cache_dir) if cache_dir is not None else default_cache_dir())
            origin = wheel
            _extract(wheel, staging)
            provenance = f"extracted from {wheel.name} (PyPI {LITS117_PACKAGE})"
        for mrc, digest in LITS117_SHA256.items():
            _verify(staging / mrc, digest, str(origin / mrc) if from_dir is not None else f"{origin}:{mrc}")

        dest.mkdir(exist_ok=True)
        volume = read_volume(staging / "img_117.mrc", with_label=True)  # axial (z, y, x), canonical LPS
        write_image_nifti(volume, dest / _OUTPUTS["img_117.mrc"])
        write_label_nifti(volume.label, volume, dest / _OUTPUTS["lab_117.mrc"])
        if (staging / "LICENSE").is_file():
            shutil.copyfile(staging / "LICENSE", dest / "LICENSE")
        write_json_atomic(
            dest / "sample.json",
            {
                "case": "lits-117",
                "description": "LiTS training case 117 (= MSD Task03 liver_117), resampled crop 128 x 128 x 128",
                "source": provenance,
                "package": LITS117_PACKAGE + " (MIT licence)",
                "spacing_mm": [1.0, 1.0, 1.0],
                "spacing_note": "nominal 1 mm isotropic: the MRC header carries no voxel size",
                "axis_note": "MRC array axes are (x, y, z) of the scan: its last axis (axial) is NIfTI axis 2 (z)",
                "labels": {"0": "background", "1": "liver", "2": "tumour"},
                "inputs_sha256": LITS117_SHA256,
                "outputs_sha256": {name: _sha256(dest / name) for name in _OUTPUTS.values()},
            },
        )  # written last: its checksums mark the conversion complete
    return dest
