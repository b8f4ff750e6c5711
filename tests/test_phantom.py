"""The CT-like phantom: seeded, plausible HU, tumours inside the liver, LiTS/MSD NIfTI layouts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from hepaseg.data.phantom import PHANTOM_HU, make_phantom, write_phantom_dataset

SHAPE = (16, 64, 64)


def test_same_seed_same_volume_other_seed_differs():
    a, b = make_phantom(SHAPE, seed=3), make_phantom(SHAPE, seed=3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    c = make_phantom(SHAPE, seed=4)
    assert not np.array_equal(a.label, c.label)


def test_volume_fields_and_hu_values():
    vol = make_phantom(SHAPE, spacing=(2.0, 0.7, 0.9), seed=1)
    assert vol.shape == SHAPE and vol.image.dtype == np.float32 and vol.label.dtype == np.uint8
    assert vol.kind == "phantom" and vol.case_id == "phantom-1"
    # affine maps index (x, y, z) to mm: diag(sx, sy, sz)
    np.testing.assert_allclose(vol.affine, np.diag([-0.9, -0.7, 2.0, 1.0]))  # canonical LPS
    assert set(np.unique(vol.label)) == {0, 1, 2}
    assert vol.image[0, 0, 0] == PHANTOM_HU["air"]  # corner is outside the body ellipse
    for value, name in ((1, "liver"), (2, "tumor")):
        assert abs(vol.image[vol.label == value].mean() - PHANTOM_HU[name]) < 3.0
    # the bright spine blob exists and tumours are hypodense against the liver
    assert vol.image.max() > 350
    assert vol.image[vol.label == 2].mean() < vol.image[vol.label == 1].mean() - 30


def test_tumours_are_small_spheres_inside_the_liver():
    vol = make_phantom((24, 96, 96), n_tumors=3, seed=0)
    tumour = vol.label == 2
    # one voxel around every tumour is still liver (or tumour): spheres lie inside the liver
    grown = ndimage.binary_dilation(tumour, structure=ndimage.generate_binary_structure(3, 1))
    assert (vol.label[grown] > 0).all()
    components, n = ndimage.label(tumour)
    assert 1 <= n <= 3
    voxel_mm3 = float(np.prod(vol.spacing))
    for i in range(1, n + 1):
        assert (components == i).sum() * voxel_mm3 <= 3 * 4 / 3 * np.pi * 6.0**3  # radius <= 6 mm each


def test_no_tumours():
    vol = make_phantom(SHAPE, n_tumors=0)
    assert (vol.label == 2).sum() == 0 and (vol.label == 1).sum() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"shape": (4, 64, 64)}, "shape"), ({"spacing": (0, 1, 1)}, "spacing"), ({"n_tumors": -1}, "n_tumors")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_phantom(**kwargs)


@pytest.mark.parametrize("layout", ["lits", "msd"])
def test_written_layouts_round_trip(tmp_path, layout):
    paths = write_phantom_dataset(tmp_path, layout, n_cases=2, shape=SHAPE, seed=5)
    if layout == "lits":
        assert [p.name for p in paths] == ["volume-0.nii.gz", "volume-1.nii.gz"]
        labels = [tmp_path / f"segmentation-{i}.nii.gz" for i in range(2)]
    else:
        assert paths == [tmp_path / "imagesTr" / f"liver_{i}.nii.gz" for i in range(2)]
        labels = [tmp_path / "labelsTr" / f"liver_{i}.nii.gz" for i in range(2)]
        assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 2
    for i, (img_path, lab_path) in enumerate(zip(paths, labels)):
        ref = make_phantom(SHAPE, seed=5 + i)
        img, lab = nib.load(img_path), nib.load(lab_path)
        np.testing.assert_allclose(img.affine, ref.affine)
        assert img.header.get_zooms() == pytest.approx((0.8, 0.8, 2.5))
        # on disk (x, y, z), int16 HU rounded
        np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), np.round(ref.image))
        np.testing.assert_array_equal(np.asarray(lab.dataobj).transpose(2, 1, 0), ref.label)


def test_written_layouts_are_read_by_io(tmp_path):
    from hepaseg.io import find_cases, read_volume

    write_phantom_dataset(tmp_path / "msd", "msd", n_cases=2, shape=SHAPE)
    cases = find_cases([tmp_path / "msd"])
    assert len(cases) == 2
    vol = read_volume(cases[1])
    ref = make_phantom(SHAPE, seed=1)
    assert vol.kind == "msd" and vol.spacing == pytest.approx((2.5, 0.8, 0.8))
    np.testing.assert_array_equal(vol.label, ref.label)
    np.testing.assert_array_equal(vol.image, np.round(ref.image))


def test_bad_layout(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        write_phantom_dataset(tmp_path, "nnunet")
