"""io.validate.check_volume: non-finite voxels, bad spacing and singular affines are refused at read time."""

from __future__ import annotations

import mrcfile
import nibabel as nib
import numpy as np
import pytest

from hepaseg.errors import HepasegError
from hepaseg.io import Volume, check_volume, read_volume


def _volume(**changes) -> Volume:
    image = np.full((4, 5, 6), -1000.0, np.float32)
    values = {"image": image, "spacing": (2.5, 0.8, 0.7), "affine": np.diag([0.7, 0.8, 2.5, 1.0]),
              "source": "scan.nii.gz"}
    return Volume(**{**values, **changes})


def test_a_good_volume_passes_unchanged():
    vol = _volume()
    assert check_volume(vol) is vol
    oblique = np.eye(4)
    oblique[:3, :3] = [[0.6, -0.4, 0], [0.4, 0.6, 0], [0, 0, 2.0]]  # rotated, anisotropic: invertible
    assert check_volume(_volume(affine=oblique)) is not None


@pytest.mark.parametrize("bad, count", [(np.nan, 3), (np.inf, 2), (-np.inf, 1)])
def test_non_finite_voxels_are_counted(bad, count):
    image = np.full((4, 5, 6), -1000.0, np.float32)
    image.flat[:count] = bad
    with pytest.raises(HepasegError, match=rf"scan.nii.gz: image holds {count} NaN/inf voxel\(s\) of 120"):
        check_volume(_volume(image=image))


def test_huge_finite_values_are_not_mistaken_for_inf():
    image = np.full((4, 5, 6), 3e38, np.float32)  # the float64 sum stays finite; float32 would overflow
    assert check_volume(_volume(image=image)) is not None


@pytest.mark.parametrize("spacing", [(0.0, 0.8, 0.7), (2.5, -0.8, 0.7), (2.5, 0.8, float("nan")),
                                     (float("inf"), 1.0, 1.0)])
def test_bad_spacing(spacing):
    with pytest.raises(HepasegError, match=r"scan.nii.gz: voxel spacing \(z, y, x\) = .* expected three finite"):
        check_volume(_volume(spacing=spacing))


@pytest.mark.parametrize("affine", [np.diag([0.7, 0.8, 0.0, 1.0]), np.zeros((4, 4)),
                                    np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])])
def test_singular_affine(affine):
    with pytest.raises(HepasegError, match=r"voxel-to-world affine is singular"):
        check_volume(_volume(affine=affine))


def test_non_finite_affine():
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[0, 3] = np.nan
    with pytest.raises(HepasegError, match=r"affine is not a finite 4 x 4 matrix"):
        check_volume(_volume(affine=affine))


def test_nifti_zero_pixdim_is_seen_through_nibabels_repair(tmp_path):
    path = tmp_path / "zero.nii"
    nib.save(nib.Nifti1Image(np.full((6, 5, 4), -1000.0, np.float32), np.diag([0.7, 0.8, 2.5, 1.0])), str(path))
    raw = bytearray(path.read_bytes())
    raw[84:88] = np.float32(0).tobytes()  # pixdim[2] (y) = 0; sform/qform still say 0.8 mm
    raw[252:256] = np.zeros(2, "<i2").tobytes()  # no sform/qform: the affine comes from pixdim
    path.write_bytes(bytes(raw))
    assert nib.load(path).header.get_zooms()[1] == 1.0  # nibabel silently takes 1 mm
    with pytest.raises(HepasegError, match=r"zero.nii: header voxel size pixdim \(x, y, z\) = \(0.7, 0, 2.5\)"):
        read_volume(path)


def test_mrc_nominal_spacing_is_accepted(tmp_path):
    # The MRC sample has no voxel size in its header; the reader's documented nominal 1 mm stays valid.
    with mrcfile.new(str(tmp_path / "img_9.mrc")) as m:
        m.set_data(np.full((3, 4, 5), -1000.0, np.float32))
    with mrcfile.new(str(tmp_path / "lab_9.mrc")) as m:
        m.set_data(np.zeros((3, 4, 5), np.uint8))
    vol = read_volume(tmp_path)
    assert vol.spacing == (1.0, 1.0, 1.0) and "nominal" in vol.meta["spacing_note"]
