"""A phantom written as NIfTI and as a DICOM series reads back, through medaug's own readers, to the
same array at the same physical coordinates, with its anatomy intact in both formats."""

from __future__ import annotations

import numpy as np
import pytest

from medaug.io import read_volume
from medaug.phantoms import make_phantom, write_phantoms
from medaug.prepare.geometry import reorient_to_ras

SHAPE = (64, 64, 10)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom_formats")
    write_phantoms(root, domains=["ct_abdomen"], n=1, seed=11, formats=("nifti", "dicom"), shape=SHAPE)
    return root


def test_nifti_and_dicom_hold_the_same_voxels_at_the_same_positions(written):
    nifti = read_volume(written / "ct_abdomen/phantom_0000/ct.nii.gz")
    dicom = read_volume(written / "ct_abdomen_dicom/phantom_0000/ct")
    assert dicom.orientation == "LPS" and nifti.orientation == "RAS"  # stored differently on purpose
    a, b = reorient_to_ras(nifti), reorient_to_ras(dicom)
    np.testing.assert_array_equal(np.asarray(a.array, np.float32), np.asarray(b.array, np.float32))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    # a known voxel (the DICOM file's first stored pixel of slice 3) at a known RAS position
    ijk = np.array([0, 0, 3])
    expected_ras = b.voxel_to_world(ijk)
    nifti_ijk = np.round(nifti.world_to_voxel(expected_ras)).astype(int)
    assert nifti.array[(0, *nifti_ijk)] == b.array[(0, *ijk)]


def test_anatomy_is_right_through_both_formats(written):
    label = read_volume(written / "ct_abdomen/phantom_0000/label.nii.gz")
    phantom = make_phantom("ct_abdomen", seed=_seed(written), shape=SHAPE)
    ids = {name: source_id for source_id, name in phantom.labels.items()}
    for image_path in ("ct_abdomen/phantom_0000/ct.nii.gz", "ct_abdomen_dicom/phantom_0000/ct"):
        image = read_volume(written / image_path)
        # the label map is RAS-stored; place it on the image grid by world position
        from medaug.prepare.geometry import align_label_to_image

        label_on_image = align_label_to_image(label, image)
        centroid = {}
        for name in ("liver", "spleen"):
            voxels = np.argwhere(label_on_image == ids[name])
            centroid[name] = image.voxel_to_world(voxels.mean(axis=0))
        assert centroid["liver"][0] > centroid["spleen"][0], image_path  # patient's right = larger RAS x
        liver_hu = np.median(image.array[0][label_on_image == ids["liver"]])
        assert 45 <= liver_hu <= 75, (image_path, liver_hu)


def _seed(root) -> int:
    import json

    return json.loads((root / "ct_abdomen/phantom_0000/phantom.json").read_text())["seed"]
