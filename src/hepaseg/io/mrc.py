"""MRC volumes (the LiTS-117 sample pair ``img_N.mrc`` + ``lab_N.mrc``) via mrcfile.

mrcfile returns data as ``(sections, rows, columns)``, but the LiTS-117 sample was saved
from an array indexed ``(x, y, z)`` of the original scan: its axial axis is the LAST array
axis (axis 0 gives sagittal slices, with the vertebrae in a row along the bottom; tumour is
in 123 axial slices, and in all 128 along axis 0). :func:`load_mrc` therefore returns
``array.transpose(2, 1, 0)``, i.e. ``(z, y, x)`` axial slices displayed like 3D-IRCADb read
from DICOM (liver on the image's left, spine at the bottom; the realdata orientation test
checks both). The sample's header carries no voxel size (cell dimensions 0), so we use a
nominal 1 mm isotropic spacing and say so in ``meta``.
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
        ``(array, spacing, spacing_note)``: the data ``(z, y, x)`` (the file's array
        transposed, see the module docstring) in its stored dtype (a copy, the file is
        closed), spacing in mm ``(z, y, x)``, and a note when the spacing is nominal
        (header voxel size 0) else ``None``.

    Raises:
        HepasegError: unreadable/corrupt file, not 3D, or a single slice.
    """
    path = Path(path)
    try:
        with mrcfile.open(str(path), mode="r") as mrc:
            # (x, y, z) on file -> (z, y, x); the copy also frees the file's memory on close.
            data = np.ascontiguousarray(np.asarray(mrc.data).transpose(2, 1, 0))
            vs = mrc.voxel_size
            # mrcfile's voxel_size.x belongs to the file's fastest (last) axis, which is our z.
            voxel = (float(vs.x), float(vs.y), float(vs.z))
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
    if min(data.shape) < 2:
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
