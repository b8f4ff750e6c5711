"""MRC volumes (the LiTS-117 sample pair ``img_N.mrc`` + ``lab_N.mrc``) via mrcfile.

mrcfile returns data as ``(sections, rows, columns)`` = ``(z, y, x)`` for the
standard axis mapping (mapc, mapr, maps) = (1, 2, 3), which is already hepaseg's
order; axis 0 of the LiTS-117 arrays is the axial axis (tumour in all 128
slices along it). The sample's header carries no voxel size (cell dimensions 0),
so we use a nominal 1 mm isotropic spacing and say so in ``meta``.
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np

from hepaseg.errors import HepasegError

__all__ = ["load_mrc"]


def load_mrc(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float], str | None]:
    """Read one MRC volume.

    Returns:
        ``(array, spacing, spacing_note)``: the data ``(z, y, x)`` in its stored dtype
        (a copy, the file is closed), spacing in mm ``(z, y, x)``, and a note when the
        spacing is nominal (header voxel size 0) else ``None``.

    Raises:
        HepasegError: unreadable/corrupt file, not 3D, or a single slice.
    """
    path = Path(path)
    try:
        with mrcfile.open(str(path), mode="r") as mrc:
            data = np.array(mrc.data)  # copy: the memory is freed when the file closes
            vs = mrc.voxel_size
            voxel = (float(vs.z), float(vs.y), float(vs.x))
            mapping = (int(mrc.header.mapc), int(mrc.header.mapr), int(mrc.header.maps))
    except (ValueError, OSError, EOFError) as exc:
        raise HepasegError(
            f"{path}: cannot read MRC (truncated or corrupt?): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}. Re-fetch the sample."
        ) from None
    if data.ndim != 3:
        raise HepasegError(
            f"{path}: MRC data has {data.ndim} dimensions {tuple(data.shape)}: expected a 3D volume. "
            "Pass a volume, not an image stack or a single image."
        )
    if data.shape[0] < 2:
        raise HepasegError(
            f"{path}: MRC data is a single 2D slice {tuple(data.shape)}: expected a 3D volume with "
            "at least 2 slices."
        )
    if mapping != (1, 2, 3):
        raise HepasegError(
            f"{path}: MRC axis mapping (mapc, mapr, maps) is {mapping}: expected (1, 2, 3). "
            "Re-save the volume with the standard axis order."
        )
    if all(v > 0 for v in voxel):
        return data, voxel, None
    return data, (1.0, 1.0, 1.0), "nominal 1 mm isotropic: the MRC header carries no voxel size"
