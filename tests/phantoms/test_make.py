"""make_phantom: a pure function of (domain, seed, shape), with the documented geometry, dtypes and labels."""

from __future__ import annotations

import numpy as np
import pytest

from medaug.errors import ConfigError
from medaug.phantoms import DOMAINS, SPECS, make_phantom, resolve_domain, resolve_shape, subject_seed
from tests.phantoms.helpers import SMALL, small_phantom


@pytest.mark.parametrize("domain", DOMAINS)
def test_same_seed_same_arrays_different_seed_different(domain):
    first = make_phantom(domain, 7, SMALL[domain])
    again = make_phantom(domain, 7, SMALL[domain])
    other = make_phantom(domain, 8, SMALL[domain])
    np.testing.assert_array_equal(first.image.array, again.image.array)
    np.testing.assert_array_equal(first.label.array, again.label.array)
    np.testing.assert_array_equal(first.image.affine, again.image.affine)
    assert not np.array_equal(first.label.array, other.label.array)
    assert not np.array_equal(first.image.array, other.image.array)


@pytest.mark.parametrize("domain", DOMAINS)
def test_volumes_dtypes_grid_and_every_structure_present(domain):
    phantom = small_phantom(domain, 0)
    spec = SPECS[domain]
    assert phantom.image.array.shape == (len(spec.channels), *SMALL[domain])
    assert phantom.label.array.shape == (1, *SMALL[domain])
    assert phantom.image.array.dtype == np.int16
    assert phantom.label.array.dtype == np.uint8
    np.testing.assert_array_equal(phantom.image.affine, phantom.label.affine)
    assert phantom.image.orientation == "RAS"
    present = set(np.unique(phantom.label.array)) - {0}
    assert present == set(spec.labels), f"missing {set(spec.labels) - present}"
    assert phantom.image.metadata["channels"] == list(spec.channels)
    assert phantom.image.metadata["domain"] == spec.recipe_domain


def test_anatomy_does_not_depend_on_the_matrix_size():
    """The field of view and the anatomy come from the seed; only the voxel size follows the matrix."""
    coarse = make_phantom("ct_abdomen", 3, (64, 64, 8))
    fine = make_phantom("ct_abdomen", 3, (128, 128, 16))
    fov_coarse = coarse.image.spacing_mm * np.array(coarse.image.spatial_shape)
    fov_fine = fine.image.spacing_mm * np.array(fine.image.spatial_shape)
    np.testing.assert_allclose(fov_coarse, fov_fine, rtol=1e-9)
    # Every other voxel of the fine map (half a fine voxel from the coarse centres) overlaps the coarse map
    # per structure; another seed does not.
    other = make_phantom("ct_abdomen", 4, (64, 64, 8))
    subsampled = fine.label.array[0, 1::2, 1::2, 1::2]
    assert _mean_dice(subsampled, coarse.label.array[0]) > 0.8
    assert _mean_dice(other.label.array[0], coarse.label.array[0]) < 0.7


def _mean_dice(first: np.ndarray, second: np.ndarray) -> float:
    ids = sorted(set(np.unique(first)) | set(np.unique(second)) - {0})
    dice = [2 * np.sum((first == i) & (second == i)) / (np.sum(first == i) + np.sum(second == i)) for i in ids]
    return float(np.mean(dice))


def test_default_geometry_matches_the_documented_acquisitions():
    ct = make_phantom("ct_abdomen", 1)
    spacing = ct.image.spacing_mm
    assert ct.image.spatial_shape == (512, 512, 40)
    assert 0.74 <= spacing[0] == spacing[1] <= 0.94 and 3.75 <= spacing[2] <= 5.0
    brain_shape = resolve_shape(SPECS["mr_brain"])
    brain = make_phantom("mr_brain", 1, (brain_shape[0] // 2, brain_shape[1] // 2, brain_shape[2] // 2))
    np.testing.assert_allclose(brain.image.spacing_mm, [2.0, 2.0, 2.0])  # 1 mm isotropic at the default matrix
    prostate = make_phantom("mr_prostate", 1, (32, 32, 24))  # default slice count
    prostate_fov = prostate.image.spacing_mm * np.array([32, 32, 24])
    assert 150 <= prostate_fov[0] <= 165 and 3.0 <= prostate.image.spacing_mm[2] <= 3.6


def test_resolve_names_shapes_and_errors():
    assert resolve_domain("ct/abdomen").name == "ct_abdomen"
    assert resolve_shape(SPECS["mr_brain"], "small") == SPECS["mr_brain"].small_shape
    assert resolve_shape(SPECS["mr_brain"], "40x50x60") == (40, 50, 60)
    with pytest.raises(ConfigError, match="ct_abdomen, mr_prostate, mr_brain"):
        resolve_domain("ct_chest")
    with pytest.raises(ConfigError, match="IxJxK"):
        resolve_shape(SPECS["ct_abdomen"], "huge")
    with pytest.raises(ConfigError, match="at least 8"):
        resolve_shape(SPECS["ct_abdomen"], (4, 64, 64))


def test_subject_seeds_differ_by_domain_index_and_run_seed():
    seeds = {subject_seed(run, domain, index) for run in (0, 1) for domain in DOMAINS for index in range(5)}
    assert len(seeds) == 2 * len(DOMAINS) * 5
    assert subject_seed(0, "mr_brain", 3) == subject_seed(0, "mr_brain", 3)
