"""Anatomy and contrast of the three phantoms, measured from their label maps and affines.

Expected values are the textbook ones the task states (HU ranges, RAS laterality, pelvic and tumour
layout), written here independently of the tissue tables in medaug/phantoms.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tests.phantoms.helpers import centroid_ras, label_id, mask, median_in, small_phantom

SEEDS = [0, 1, 2]

# Stated CT ranges (HU) of each structure's median.
CT_HU = {
    "liver": (50, 70),
    "spleen": (40, 55),
    "kidney_left": (30, 40),
    "kidney_right": (30, 40),
    "skeletal_muscle": (40, 60),
    "subcutaneous_fat": (-120, -80),
    "aorta": (150, 250),
    "vertebrae": (300, 1000),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("structure", sorted(CT_HU))
def test_ct_median_hu_in_stated_range(structure, seed):
    low, high = CT_HU[structure]
    assert low <= median_in(small_phantom("ct_abdomen", seed), structure, "ct") <= high


@pytest.mark.parametrize("seed", SEEDS)
def test_ct_air_outside_the_body_and_noise_level(seed):
    phantom = small_phantom("ct_abdomen", seed)
    ct = phantom.image.array[0].astype(np.float64)
    outside = phantom.label.array[0] == 0
    assert abs(np.median(ct[outside]) + 1000) <= 15
    assert 8 <= np.std(ct[outside]) <= 25  # Gaussian noise sigma 10-20 HU (air is flat apart from it)


@pytest.mark.parametrize("seed", SEEDS)
def test_ct_laterality_in_ras_world(seed):
    """Patient's right is +x in RAS: the liver lies right of the spleen, kidney_right right of kidney_left."""
    phantom = small_phantom("ct_abdomen", seed)
    assert centroid_ras(phantom, "liver")[0] > centroid_ras(phantom, "spleen")[0]
    assert centroid_ras(phantom, "kidney_left")[0] < centroid_ras(phantom, "kidney_right")[0]
    assert centroid_ras(phantom, "kidney_left")[0] < 0 < centroid_ras(phantom, "kidney_right")[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_ct_spine_posterior_midline_with_aorta_anterior_left(seed):
    phantom = small_phantom("ct_abdomen", seed)
    spine, aorta, body = centroid_ras(phantom, "vertebrae"), centroid_ras(phantom, "aorta"), body_centre(phantom)
    assert abs(spine[0] - body[0]) < 10  # midline
    assert spine[1] < body[1]  # posterior half
    assert aorta[0] < spine[0] and aorta[1] > spine[1]  # left of and anterior to the spine
    for kidney in ("kidney_left", "kidney_right"):
        assert centroid_ras(phantom, kidney)[1] < body[1]  # retroperitoneal: posterior


def body_centre(phantom) -> np.ndarray:
    ijk = np.argwhere(phantom.label.array[0] > 0).mean(axis=0)
    return phantom.label.voxel_to_world(ijk)


@pytest.mark.parametrize("seed", SEEDS)
def test_prostate_below_bladder_and_rectum_behind(seed):
    phantom = small_phantom("mr_prostate", seed)
    peripheral, transition = (
        centroid_ras(phantom, "prostate_peripheral_zone"),
        centroid_ras(phantom, "prostate_transition_zone"),
    )
    bladder, rectum = centroid_ras(phantom, "urinary_bladder"), centroid_ras(phantom, "rectum")
    prostate = _union_centroid(phantom, ["prostate_peripheral_zone", "prostate_transition_zone"])
    assert prostate[2] < bladder[2]  # inferior (z smaller)
    assert rectum[1] < prostate[1]  # posterior (y smaller)
    assert transition[1] > peripheral[1]  # the transition zone is anterior, the peripheral zone posterior


def _union_centroid(phantom, names: list[str]) -> np.ndarray:
    ids = [label_id(phantom, name) for name in names]
    ijk = np.argwhere(np.isin(phantom.label.array[0], ids)).mean(axis=0)
    return phantom.label.voxel_to_world(ijk)


@pytest.mark.parametrize("seed", SEEDS)
def test_prostate_contrasts(seed):
    phantom = small_phantom("mr_prostate", seed)
    pz, tz = "prostate_peripheral_zone", "prostate_transition_zone"
    assert median_in(phantom, pz, "t2") > median_in(phantom, tz, "t2")
    assert median_in(phantom, pz, "adc") > median_in(phantom, tz, "adc")
    for channel in ("t2", "adc"):  # urine is the brightest structure on T2 and has the highest ADC
        others = [median_in(phantom, name, channel) for name in (pz, tz, "rectum")]
        assert median_in(phantom, "urinary_bladder", channel) > max(others)


@pytest.mark.parametrize("seed", SEEDS)
def test_mr_background_is_rayleigh_distributed(seed):
    """Magnitude (Rician) noise: air outside the head is Rayleigh, whose mean / std is sqrt(pi / (4 - pi)) ≈ 1.91
    (a clipped Gaussian would give about 0.7, plain Gaussian noise about 0)."""
    phantom = small_phantom("mr_brain", seed)
    for channel in range(phantom.image.num_channels):
        corner = phantom.image.array[channel, :10, :10, :].astype(np.float64)
        assert np.all(phantom.label.array[0, :10, :10, :] == 0)
        assert corner.min() >= 0
        assert corner.mean() / corner.std() == pytest.approx(np.sqrt(np.pi / (4 - np.pi)), abs=0.2)


@pytest.mark.parametrize("seed", SEEDS)
def test_brain_tumour_parts_nest(seed):
    """Necrosis is surrounded by enhancing tumour, which is surrounded by edema (6-neighbourhoods)."""
    phantom = small_phantom("mr_brain", seed)
    necrosis, enhancing, edema = (
        mask(phantom, "brain_tumor_necrosis"),
        mask(phantom, "brain_tumor_enhancing"),
        mask(phantom, "brain_tumor_edema"),
    )
    cross = ndimage.generate_binary_structure(3, 1)
    around_necrosis = ndimage.binary_dilation(necrosis, cross) & ~necrosis
    assert necrosis.any() and np.all(enhancing[around_necrosis])
    core = necrosis | enhancing
    around_core = ndimage.binary_dilation(core, cross) & ~core
    assert np.all(edema[around_core])
    # One connected tumour (6-connectivity).
    _, components = ndimage.label(core | edema, cross)
    assert components == 1


@pytest.mark.parametrize("seed", SEEDS)
def test_brain_contrasts(seed):
    phantom = small_phantom("mr_brain", seed)
    assert median_in(phantom, "brain_tumor_edema", "flair") > median_in(phantom, "brain_white_matter", "flair")
    assert median_in(phantom, "brain_grey_matter", "flair") > median_in(phantom, "brain_white_matter", "flair")
    assert median_in(phantom, "brain_white_matter", "t1c") > median_in(phantom, "brain_grey_matter", "t1c")
    enhancing = median_in(phantom, "brain_tumor_enhancing", "t1c")
    others = [median_in(phantom, name, "t1c") for name in phantom.labels.values() if name != "brain_tumor_enhancing"]
    assert enhancing > max(others)  # the bright ring on T1c
    assert median_in(phantom, "csf", "flair") < median_in(phantom, "brain_white_matter", "flair")  # fluid suppressed


@pytest.mark.parametrize("seed", SEEDS)
def test_brain_lies_inside_the_skull(seed):
    """In every axial slice of the upper two thirds (the field of view cuts the head below), CSF, grey and
    white matter and tumour lie inside the skull ring."""
    phantom = small_phantom("mr_brain", seed)
    skull = mask(phantom, "skull")
    inner = np.isin(
        phantom.label.array[0], [label_id(phantom, name) for name in phantom.labels.values() if name != "skull"]
    )
    num_slices = skull.shape[2]
    for k in range(num_slices // 3, num_slices):
        if inner[:, :, k].any():
            assert np.all(ndimage.binary_fill_holes(skull[:, :, k])[inner[:, :, k]]), f"slice {k}"
