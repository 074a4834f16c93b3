"""Intensity fidelity inside masks, against values read straight from the shards and the index."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medaug import vocab
from medaug.data.dataset import PreparedSliceDataset
from medaug.data.index import read_index
from medaug.eval.fidelity import FidelityConfig, compare_intensity
from tests.eval.conftest import write_synthetic_folder

SHIFT_MODEL = 0.1  # model units; CT abdomen window W400 → 0.1 · 200 HU = 20 HU


def direct_values(prepared, split, domain, structure, channel, units="row"):
    """Pixel values of ``structure`` in ``channel``: shards read with numpy, mapped by hand."""
    frame = read_index(prepared / "index.parquet").to_pandas()
    frame = frame[(frame["split"] == split) & (frame["domain"] == domain)]
    values = []
    for row in frame.itertuples():
        if structure not in row.structures_present:
            continue
        image = np.load(prepared / f"{row.shard}.image.npy")[row.shard_row, channel].astype(np.float64)
        label = np.load(prepared / f"{row.shard}.label.npy")[row.shard_row]
        record = json.loads(row.intensity)[channel]
        low, high = (record["low"], record["high"]) if units == "row" else (0.0, 1000.0)
        model = np.clip(image[label == vocab.structure(structure).id], -1, 1)
        values.append(model * (high - low) / 2 + (high + low) / 2)
    return np.concatenate(values)


def real_test_as_synthetic(eval_data, tmp_path, transform=None):
    frame = read_index(eval_data["real"] / "index.parquet").to_pandas()
    ids = frame.loc[frame["split"] == "test", "slice_id"].tolist()
    return write_synthetic_folder(tmp_path / "synthetic", [(eval_data["real"], ids)], transform=transform)


@pytest.mark.parametrize("domain, structure, channel, units", [
    ("ct/abdomen", "liver", 0, "row"), ("mr/prostate", "prostate_peripheral_zone", 1, "export"),
    ("mr/brain", "brain_white_matter", 0, "export")], ids=["ct-hu", "mr-adc", "mr-flair"])
def test_real_statistics_match_direct_reading(eval_data, synthetic_fresh, domain, structure, channel, units):
    result = compare_intensity(PreparedSliceDataset(eval_data["real"], split="test"), PreparedSliceDataset(synthetic_fresh))
    channel_name = read_index(eval_data["real"] / "index.parquet").to_pandas().query("domain == @domain")["channels"].iloc[0][channel]
    entry = result["domains"][domain][structure][channel_name]
    expected = direct_values(eval_data["real"], "test", domain, structure, channel, units)
    q25, median, q75 = np.quantile(expected, [0.25, 0.5, 0.75])
    assert entry["real"]["n_pixels"] == expected.size
    assert (entry["real"]["median"], entry["real"]["q25"], entry["real"]["q75"]) == pytest.approx((median, q25, q75))
    assert entry["units"] == ("HU" if domain.startswith("ct") else "a.u. (export scale 0-1000)")


def test_source_scale_uses_each_rows_own_mr_mapping(eval_data, synthetic_fresh):
    config = FidelityConfig(mr_scale="source")
    result = compare_intensity(PreparedSliceDataset(eval_data["real"], split="test"), PreparedSliceDataset(synthetic_fresh),
                               config)
    entry = result["domains"]["mr/prostate"]["urinary_bladder"]["t2"]
    expected = direct_values(eval_data["real"], "test", "mr/prostate", "urinary_bladder", 0, "row")
    assert entry["real"]["median"] == pytest.approx(float(np.median(expected)))
    assert entry["units"] == "a.u."


def test_identical_sets_agree_and_a_shift_shows_in_hu(eval_data, tmp_path):
    real = PreparedSliceDataset(eval_data["real"], split="test")
    same = compare_intensity(real, PreparedSliceDataset(real_test_as_synthetic(eval_data, tmp_path / "same")))
    liver = same["domains"]["ct/abdomen"]["liver"]["ct"]
    assert liver["median_difference"] == pytest.approx(0.0) and liver["iqr_ratio"] == pytest.approx(1.0)
    assert liver["median_in_real_iqr"] is True
    shifted_folder = real_test_as_synthetic(eval_data, tmp_path / "shifted", transform=lambda x, rng: x + SHIFT_MODEL)
    shifted = compare_intensity(real, PreparedSliceDataset(shifted_folder))["domains"]["ct/abdomen"]
    for structure in ("liver", "spleen", "kidney_left"):
        assert shifted[structure]["ct"]["median_difference"] == pytest.approx(20.0, abs=0.5), structure


def test_subsampling_keeps_about_max_values_pixels(eval_data, synthetic_fresh):
    real = PreparedSliceDataset(eval_data["real"], split="test")
    full = compare_intensity(real, PreparedSliceDataset(synthetic_fresh))["domains"]["ct/abdomen"]["body"]["ct"]
    capped = compare_intensity(real, PreparedSliceDataset(synthetic_fresh),
                               FidelityConfig(max_values=500))["domains"]["ct/abdomen"]["body"]["ct"]
    assert full["real"]["n_pixels"] > 2000
    assert 350 < capped["real"]["n_pixels"] < 650 and 350 < capped["synthetic"]["n_pixels"] < 650
    assert capped["real"]["median"] == pytest.approx(full["real"]["median"], abs=0.25 * full["real"]["iqr"])


def test_unknown_mr_scale_is_refused():
    with pytest.raises(Exception, match="mr_scale"):
        FidelityConfig(mr_scale="zscore")
