"""One canonical orientation for every source, and masks written back in the source's geometry.

* Real data (``realdata``): in nearly every slice with liver, the liver lies in the image's
  left half and the spine (the largest component above 500 HU) below the body's centre, on
  both real cases; the same check fails on sagittal, coronal, transposed and flipped slicings.
* Synthetic: one LiTS-layout case saved with flipped and permuted axes (affine adjusted to
  describe the same anatomy) reads and prepares to identical slices, and each written mask
  overlays its own input exactly in world coordinates (nibabel), with its sform/qform codes.
* An oblique affine goes to the closest canonical orientation.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff
from scipy import ndimage

from hepaseg.data import prepare
from hepaseg.data.phantom import make_phantom
from hepaseg.io import CANONICAL_AXCODES, read_volume, write_label_nifti
from hepaseg.io.orientation import axcodes_of

# --------------------------------------------------------------------------------------------
# the anatomical check


def orientation_agreement(image: np.ndarray, label: np.ndarray) -> tuple[float, float, int]:
    """Share of liver slices whose liver centroid is in the image's left half, and share whose
    spine (largest connected component above 500 HU) lies below the body's centre.

    Args:
        image: ``(z, y, x)`` HU; label: ``(z, y, x)`` {0, 1, 2}.

    Returns:
        ``(liver_left_fraction, spine_below_fraction, n_liver_slices)``.
    """
    liver_slices = [z for z in range(image.shape[0]) if (label[z] > 0).any()]
    left = below = 0
    for z in liver_slices:
        _, xs = np.nonzero(label[z] > 0)
        left += xs.mean() < image.shape[2] / 2
        bone, n = ndimage.label(image[z] > 500)
        body_ys, _ = np.nonzero(image[z] > -500)
        if n == 0 or body_ys.size == 0:
            continue
        sizes = ndimage.sum_labels(np.ones_like(bone), bone, index=np.arange(1, n + 1))
        spine_ys, _ = np.nonzero(bone == 1 + int(np.argmax(sizes)))
        below += spine_ys.mean() > body_ys.mean()
    n = len(liver_slices)
    return left / n, below / n, n


def _orientation_ok(image: np.ndarray, label: np.ndarray) -> bool:
    liver_left, spine_below, _ = orientation_agreement(image, label)
    return liver_left >= 0.85 and spine_below >= 0.85


@pytest.mark.realdata
@pytest.mark.parametrize("case", ["3Dircadb1.1", "lits117"])
def test_realdata_axial_display_orientation(shared_data: Path, case: str):
    vol = read_volume(shared_data / case)
    liver_left, spine_below, n = orientation_agreement(vol.image, vol.label)
    assert n >= 90, n  # IRCADb: 98 liver slices; LiTS-117 crop: 128
    # At least 85 %: the LiTS-117 crop cuts the body at the liver's ends.
    assert liver_left >= 0.85, f"{case}: liver on the image's left in only {liver_left:.0%} of liver slices"
    assert spine_below >= 0.85, f"{case}: spine below the body's centre in only {spine_below:.0%} of liver slices"

    # The check is not vacuous: every wrong slicing of the same arrays fails it.
    img, lab = vol.image, vol.label
    wrong = {
        "sagittal (axis 2 as slices)": (img.transpose(2, 0, 1), lab.transpose(2, 0, 1)),
        "coronal (axis 1 as slices)": (img.transpose(1, 0, 2), lab.transpose(1, 0, 2)),
        "transposed in-plane": (img.transpose(0, 2, 1), lab.transpose(0, 2, 1)),
        "left-right flip": (img[:, :, ::-1], lab[:, :, ::-1]),
        "up-down flip": (img[:, ::-1, :], lab[:, ::-1, :]),
    }
    for name, (wi, wl) in wrong.items():
        assert not _orientation_ok(wi, wl), f"{case}: the orientation check passed a {name} slicing"


@pytest.mark.realdata
def test_realdata_lits117_is_axial_on_last_mrc_axis(lits117_dir: Path):
    import mrcfile

    with mrcfile.open(str(lits117_dir / "lab_117.mrc")) as m:
        raw = np.asarray(m.data)
    vol = read_volume(lits117_dir)
    np.testing.assert_array_equal(vol.label, raw.transpose(2, 1, 0))  # (x, y, z) on file -> (z, y, x)
    assert int((vol.label == 2).any(axis=(1, 2)).sum()) == 123  # tumour in 123 axial slices
    assert int((raw == 2).any(axis=(1, 2)).sum()) == 128  # ...and in all 128 sagittal ones
    assert vol.source_geometry is not None and vol.source_geometry.is_identity


# --------------------------------------------------------------------------------------------
# synthetic: the same anatomy stored in other voxel orders


def _save(path: Path, data_xyz: np.ndarray, affine: np.ndarray, *, sform_code: int = 1, qform_code: int = 1):
    img = nib.Nifti1Image(data_xyz, affine)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    nib.save(img, str(path))
    return path


def _reoriented_copy(vol, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The phantom's (x, y, z) arrays stored in another voxel order, with the affine adjusted
    so that every voxel keeps its world position."""
    image_xyz = vol.image.transpose(2, 1, 0)
    label_xyz = vol.label.transpose(2, 1, 0)
    new_image = apply_orientation(image_xyz, ornt)
    new_label = apply_orientation(label_xyz, ornt)
    new_affine = vol.affine @ inv_ornt_aff(ornt, image_xyz.shape)
    return np.round(new_image).astype(np.int16), new_label.astype(np.uint8), new_affine


ORIENTATIONS = {
    # ornt rows: (new axis of old axis i, flip)
    "RAS (x and y flipped)": np.array([[0, -1], [1, -1], [2, 1]]),
    "z flipped": np.array([[0, 1], [1, 1], [2, -1]]),
    "x<->y permuted, all flipped": np.array([[1, -1], [0, -1], [2, -1]]),
    "z first (x, y, z) -> (z, x, y)": np.array([[1, 1], [2, 1], [0, 1]]),
}


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((12, 40, 48), spacing=(2.5, 0.8, 0.7), n_tumors=2, seed=3)


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_reoriented_source_reads_to_the_same_canonical_volume(tmp_path: Path, phantom, name: str):
    image, label, affine = _reoriented_copy(phantom, ORIENTATIONS[name])
    _save(tmp_path / "volume-1.nii.gz", image, affine)
    _save(tmp_path / "segmentation-1.nii.gz", label, affine)
    vol = read_volume(tmp_path / "volume-1.nii.gz")
    assert axcodes_of(vol.affine) == "".join(CANONICAL_AXCODES)
    assert not vol.source_geometry.is_identity
    np.testing.assert_array_equal(vol.image, np.round(phantom.image))
    np.testing.assert_array_equal(vol.label, phantom.label)
    np.testing.assert_allclose(vol.affine, phantom.affine, atol=1e-4)
    assert vol.spacing == pytest.approx(phantom.spacing)


def test_reoriented_sources_prepare_to_identical_slices(tmp_path: Path, phantom):
    canonical = tmp_path / "canonical"
    flipped = tmp_path / "flipped"
    for folder, ornt in ((canonical, np.array([[0, 1], [1, 1], [2, 1]])),
                         (flipped, ORIENTATIONS["x<->y permuted, all flipped"])):  # fmt: skip
        folder.mkdir()
        image, label, affine = _reoriented_copy(phantom, ornt)
        _save(folder / "volume-1.nii.gz", image, affine)
        _save(folder / "segmentation-1.nii.gz", label, affine)
    outs = []
    for folder in (canonical, flipped):
        out = tmp_path / f"prep-{folder.name}"
        prepare([folder], out, size=32, slices="all", split=(1.0, 0.0, 0.0))
        outs.append(out)
    shards = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.npz"))
    assert shards
    for rel in shards:
        a, b = np.load(outs[0] / rel), np.load(outs[1] / rel)
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{rel}:{key}")
    manifest = json.loads((outs[1] / "manifest.json").read_text())
    assert manifest["orientation"].startswith("LPS")
    assert manifest["cases"][0]["source_axcodes"] == axcodes_of(_reoriented_copy(phantom, ORIENTATIONS[
        "x<->y permuted, all flipped"])[2])


@pytest.mark.parametrize("name", list(ORIENTATIONS))
@pytest.mark.parametrize("codes", [(1, 1), (2, 1), (0, 1), (2, 0)])
def test_written_mask_overlays_its_source_in_world_coordinates(tmp_path: Path, phantom, name, codes):
    sform_code, qform_code = codes
    image, label, affine = _reoriented_copy(phantom, ORIENTATIONS[name])
    src = _save(tmp_path / "scan.nii.gz", image, affine, sform_code=sform_code, qform_code=qform_code)
    vol = read_volume(src)
    tumour = (vol.image < 60) & (vol.image > 20)  # any mask computed on the canonical grid
    out = write_label_nifti(tumour, vol, tmp_path / "mask.nii.gz")

    source, written = nib.load(str(src)), nib.load(str(out))
    assert written.shape == source.shape  # the source's voxel order
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    assert int(written.header["sform_code"]) == sform_code
    assert int(written.header["qform_code"]) == qform_code
    # Voxel for voxel in world coordinates: the mask's voxel (i, j, k) sits where the source's
    # voxel (i, j, k) sits, and it marks exactly the source voxels that meet the same rule.
    src_data = np.asarray(source.dataobj)
    expected = (src_data < 60) & (src_data > 20)
    np.testing.assert_array_equal(np.asarray(written.dataobj).astype(bool), expected)
    # ...and an independent world-coordinate check on a few voxels through both affines.
    rng = np.random.default_rng(0)
    for ijk in rng.integers(0, source.shape, size=(5, 3)):
        world = source.affine @ [*ijk, 1]
        back = np.linalg.solve(written.affine, world)[:3]
        np.testing.assert_allclose(back, ijk, atol=1e-4)


def test_oblique_affine_goes_to_the_closest_canonical_orientation(tmp_path: Path, phantom):
    angle = np.radians(10.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0, 0], [np.sin(angle), np.cos(angle), 0, 0], [0, 0, 1, 0],
                    [0, 0, 0, 1]])  # fmt: skip
    image, label, affine = _reoriented_copy(phantom, ORIENTATIONS["RAS (x and y flipped)"])
    oblique = rot @ affine
    src = _save(tmp_path / "oblique.nii.gz", image, oblique)
    vol = read_volume(src)
    np.testing.assert_array_equal(vol.image, np.round(phantom.image))  # same voxels, no interpolation
    assert vol.source_geometry.oblique_deg == pytest.approx(10.0, abs=1e-6)
    np.testing.assert_allclose(vol.affine, rot @ phantom.affine, atol=1e-4)  # exact geometry kept
    out = write_label_nifti(vol.image > 0, vol, tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), image > 0)
    np.testing.assert_allclose(nib.load(str(out)).affine, oblique, atol=1e-4)
