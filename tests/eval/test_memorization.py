"""Memorization: planted copies of training slices are flagged, new phantom patients are not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medaug.data.dataset import PreparedSliceDataset
from medaug.eval.memorization import (
    MemorizationConfig,
    MemorizationInputs,
    evaluate_memorization,
    find_nearest,
    near_copy_thresholds,
    nearest_by_correlation,
    nearest_by_distance,
    write_closest_pairs,
)


def inputs_for(eval_data, synthetic, features=False):
    real = eval_data["real"]
    inputs = MemorizationInputs(PreparedSliceDataset(synthetic, channels_out=2),
                                PreparedSliceDataset(real, split="train", channels_out=2),
                                PreparedSliceDataset(real, split="val", channels_out=2))
    if features:  # a deterministic feature space: 8x8 area-averaged pixels of every channel
        inputs.backbone = "pixels-8"
        inputs.features = {name: pixel_features(dataset) for name, dataset in
                           (("synthetic", inputs.synthetic), ("train", inputs.train), ("val", inputs.val))}
    return inputs


def pixel_features(dataset):
    image = dataset.read_batch(list(range(len(dataset))))["image"].float().numpy()
    n, c, h, w = image.shape
    return image.reshape(n, c, 8, h // 8, 8, w // 8).mean(axis=(3, 5)).reshape(n, -1).astype(np.float64)


def test_planted_copies_are_flagged_and_fresh_samples_are_not(eval_data, synthetic_with_copies, planted_copies):
    records, thresholds = find_nearest(inputs_for(eval_data, synthetic_with_copies, features=True))
    synthetic = records[records["set"] == "synthetic"]
    assert len(synthetic) == len(PreparedSliceDataset(synthetic_with_copies))
    flagged = synthetic[synthetic["flagged"]]
    assert sorted(flagged["slice_id"]) == sorted(planted_copies)
    assert (flagged["pixel_nearest"] == flagged["slice_id"]).all()  # each copy found its own original
    assert (flagged["feature_nearest"] == flagged["slice_id"]).all()
    np.testing.assert_allclose(flagged[["ncc", "ssim"]].to_numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(flagged["feature_distance"], 0.0, atol=1e-9)
    fresh = synthetic[~synthetic["slice_id"].isin(planted_copies)]
    assert (fresh["ncc"] < 0.99).all() and (fresh["feature_distance"] > 0).all()
    assert set(thresholds) == {"ct/abdomen", "mr/brain", "mr/prostate"}


def test_fresh_phantoms_are_not_flagged(eval_data, synthetic_fresh):
    summary, records = evaluate_memorization(inputs_for(eval_data, synthetic_fresh))
    assert summary["overall"]["n_flagged"] == 0 and summary["overall"]["fraction_flagged"] == 0.0
    assert summary["overall"]["n_synthetic"] == len(PreparedSliceDataset(synthetic_fresh))
    assert summary["overall"]["n_val"] == len(PreparedSliceDataset(eval_data["real"], split="val"))
    val = records[records["set"] == "val"]
    assert summary["overall"]["ncc"]["val"]["p50"] == pytest.approx(float(np.median(val["ncc"])))


def test_summary_counts_and_closest_pairs(eval_data, synthetic_with_copies, planted_copies, tmp_path):
    inputs = inputs_for(eval_data, synthetic_with_copies, features=True)
    config = MemorizationConfig(pairs=4)
    summary, records = evaluate_memorization(inputs, config, tmp_path / "records.parquet")
    total = len(PreparedSliceDataset(synthetic_with_copies))
    assert summary["overall"]["n_flagged"] == len(planted_copies)
    assert summary["overall"]["fraction_flagged"] == pytest.approx(len(planted_copies) / total)
    assert sum(d["n_flagged"] for d in summary["domains"].values()) == len(planted_copies)
    assert [pair["flagged"] for pair in summary["closest_pairs"]] == [True] * 4
    assert summary["backbone"] == "pixels-8" and 0.0 <= summary["overall"]["closer_than_val_p05"] <= 1.0
    assert len(pd.read_parquet(tmp_path / "records.parquet")) == len(records)
    path = write_closest_pairs(records, inputs, tmp_path / "pairs.png", pairs=3)
    width, height = Image.open(path).size
    side = 64 * 3  # 64² slices zoomed to at least 160 pixels
    assert (width, height) == (2 * side, 3 * (side + 14))


def test_nearest_by_correlation_matches_numpy(eval_data):
    train = PreparedSliceDataset(eval_data["real"], split="train", domains="mr/prostate")
    val = PreparedSliceDataset(eval_data["real"], split="val", domains="mr/prostate")
    config = MemorizationConfig(size=32, batch_size=4)  # several reference batches
    index, ncc = nearest_by_correlation(val, np.arange(len(val)), train, np.arange(len(train)), 2, config)

    def small(dataset):
        image = dataset.read_batch(list(range(len(dataset))))["image"].double().numpy()[:, :2]
        n = image.shape[0]
        return image.reshape(n, 2, 32, 2, 32, 2).mean(axis=(3, 5)).reshape(n, -1)

    correlation = np.corrcoef(small(val), small(train))[: len(val), len(val):]
    np.testing.assert_array_equal(index, correlation.argmax(axis=1))
    np.testing.assert_allclose(ncc, correlation.max(axis=1), atol=1e-6)


def test_nearest_by_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    query, reference = rng.normal(size=(23, 5)), rng.normal(size=(40, 5))
    index, distance = nearest_by_distance(query, reference, chunk=7)
    brute = np.linalg.norm(query[:, None, :] - reference[None, :, :], axis=2)
    np.testing.assert_array_equal(index, brute.argmin(axis=1))
    np.testing.assert_allclose(distance, brute.min(axis=1))


def test_thresholds_follow_the_val_similarities():
    config = MemorizationConfig(ncc_min=0.9, ssim_min=0.8, val_quantile=0.5)
    val = pd.DataFrame({"ncc": [0.5, 0.95, 0.99], "ssim": [0.1, 0.2, 0.3]})
    assert near_copy_thresholds(val, config) == pytest.approx({"ncc": 0.95, "ssim": 0.8})
    assert near_copy_thresholds(pd.DataFrame(), config) == pytest.approx({"ncc": 0.9, "ssim": 0.8})
    exact = pd.DataFrame({"ncc": [1.0, 1.0], "ssim": [1.0, 1.0]})
    assert near_copy_thresholds(exact, config)["ncc"] < 1.0  # an exact copy still passes the bar
