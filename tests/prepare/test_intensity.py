"""Intensity mappings (CT window, MR percentiles) and the body mask, on tiny arrays and real BraTS."""

from __future__ import annotations

import numpy as np
import pytest

from medaug.prepare.geometry import HarmonizeError
from medaug.prepare.intensity import (
    IntensityMapping,
    body_mask,
    ct_to_model,
    keep_slice,
    mr_background_threshold,
    mr_to_model,
    slice_body_fraction,
)

# ---------------------------------------------------------------- CT and MR mappings


def test_ct_window_round_trip_within_one_hu():
    hu = np.arange(-1024, 3072, 7, dtype=np.int16)
    model, mapping = ct_to_model(hu, window_hu=(-160, 240))
    assert model.dtype == np.float32
    assert model.min() == -1.0 and model.max() == 1.0
    inside = (hu >= -160) & (hu <= 240)
    np.testing.assert_allclose(mapping.to_source(model[inside]), hu[inside], atol=1.0)
    np.testing.assert_allclose(model[inside], (hu[inside] - 40.0) / 200.0, atol=1e-6)  # W400/L40 by hand
    assert (model[hu < -160] == -1.0).all() and (model[hu > 240] == 1.0).all()
    assert (mapping.scale, mapping.offset, mapping.units) == (200.0, 40.0, "HU")


def test_mr_percentiles_are_measured_inside_the_body():
    rng = np.random.default_rng(0)
    values = rng.gamma(4.0, 50.0, size=(30, 30, 8))
    body = np.zeros(values.shape, bool)
    body[5:25, 5:25] = True
    values[~body] = -3.0  # normalized-data background, far below the body
    model, mapping = mr_to_model(values, body, percentiles=(1.0, 99.0))
    low, high = np.percentile(values[body], [1.0, 99.0])
    assert (mapping.low, mapping.high) == pytest.approx((low, high))
    assert (model[~body] == -1.0).all()
    inside = body & (values >= low) & (values <= high)
    np.testing.assert_allclose(mapping.to_source(model[inside]), values[inside], rtol=1e-5, atol=1e-3)
    assert IntensityMapping.from_dict(mapping.to_dict()) == mapping
    assert mapping.to_dict()["scale"] == pytest.approx((high - low) / 2)


def test_mr_mapping_refuses_an_empty_body_and_a_constant_channel():
    values = np.ones((4, 4, 4))
    with pytest.raises(HarmonizeError, match="empty"):
        mr_to_model(values, np.zeros(values.shape, bool))
    with pytest.raises(HarmonizeError, match="constant"):
        mr_to_model(values, np.ones(values.shape, bool))


# ---------------------------------------------------------------- body mask


def ellipse_phantom(shape=(64, 56, 10)):
    """(body (I, J, K) bool, lung hole (I, J, K) bool, table and a one-voxel pad under the body (I, J, K) bool)."""
    i, j = np.mgrid[: shape[0], : shape[1]]
    body_2d = ((i - 30) / 22.0) ** 2 + ((j - 27) / 17.0) ** 2 < 1
    lung_2d = ((i - 30) / 6.0) ** 2 + ((j - 22) / 5.0) ** 2 < 1
    table_2d = ((i >= 58) & (i <= 59) | (i == 53)) & (j > 4) & (j < 50)  # the table, and a one-voxel pad
    table_2d[52, 27] = True  # touching the body (bottom row 51) at one point
    def extrude(mask_2d):
        return np.repeat(mask_2d[:, :, None], shape[2], axis=2)
    return extrude(body_2d), extrude(lung_2d), extrude(table_2d)


def test_ct_body_mask_fills_lungs_and_drops_table_and_pad():
    body, lung, table = ellipse_phantom()
    hu = np.full(body.shape, -1000.0)
    hu[body] = 40.0
    hu[lung] = -850.0
    hu[table] = 200.0
    mask = body_mask(hu[None], "ct")
    np.testing.assert_array_equal(mask[:52], body[:52])  # body and filled lung, nothing lost
    assert not mask[53:].any()  # table and pad gone (the contact voxel at row 52 may stay)


def test_mr_body_mask_on_raw_data_with_rician_background():
    rng = np.random.default_rng(1)
    body, _, _ = ellipse_phantom()
    sigma = 12.0
    signal = np.where(body, rng.uniform(150, 600, size=body.shape), 0.0)
    magnitude = np.hypot(signal + rng.normal(0, sigma, body.shape), rng.normal(0, sigma, body.shape))
    mask = body_mask(magnitude.astype(np.float32), "mr")
    dice = 2 * (mask & body).sum() / (mask.sum() + body.sum())
    assert dice > 0.99


def test_mr_background_threshold_of_a_constant_background_sits_just_above_it():
    rng = np.random.default_rng(2)
    values = np.full(100_000, -1.7)
    values[:20_000] = rng.normal(0.0, 1.0, 20_000).clip(-1.6, None)
    threshold = mr_background_threshold(values)
    assert -1.7 < threshold < -1.6  # above the constant, below the darkest body value
    assert (values[:20_000] > threshold).all()


def test_body_mask_of_a_2d_slice():
    body, lung, _ = ellipse_phantom((64, 56, 1))
    hu = np.where(body, 30.0, -1000.0)[:, :, 0]
    hu[lung[:, :, 0]] = -900.0
    mask = body_mask(hu, "ct")
    assert mask[lung[:, :, 0]].all()  # the hole is filled
    assert (mask ^ body[:, :, 0]).sum() <= 4  # the opening may trim single-pixel tips of the ellipse


@pytest.mark.real
def test_mr_body_mask_on_z_scored_brats_matches_the_brain_mask(real_dir):
    from medaug.io.nifti import read_nifti

    folder = real_dir / "brats2013" / "pat0005"
    flair = read_nifti(folder / "Flair_subtrMeanDivStd.nii.gz").array[0]
    brain = read_nifti(folder / "brainmask.nii.gz").array[0] > 0
    constant = flair == flair.min()
    assert flair.min() < -3 and constant.mean() > 0.5  # the background is a negative constant, not zero
    mask = body_mask(flair, "mr")
    assert mask[brain].mean() >= 0.99  # covers the brain
    assert (mask & constant & ~brain).sum() <= 0.01 * brain.sum()  # leaves the constant background out
    assert 2 * (mask & brain).sum() / (mask.sum() + brain.sum()) > 0.9


# ---------------------------------------------------------------- body fraction


def test_slice_body_fraction_and_keep_slice():
    body = np.zeros((3, 10, 10), bool)
    body[1, :2, :2] = True  # 4%
    body[2, :5, :5] = True  # 25%
    fractions = slice_body_fraction(body)
    np.testing.assert_allclose(fractions, [0.0, 0.04, 0.25])
    np.testing.assert_array_equal(keep_slice(fractions, 0.05), [False, False, True])
    np.testing.assert_array_equal(keep_slice(fractions, 0.04), [False, True, True])
