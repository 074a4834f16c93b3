"""``medaug.monai`` datasets: items checked against the index and shards read with pyarrow and numpy, MONAI
dictionary transforms, CacheDataset, DataLoader collation, and the real/synthetic mix under DistributedSampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.transforms import CastToTyped, Compose, CopyItemsd, DeleteItemsd, RandAffined, RandGaussianNoised
from scipy import ndimage
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import DistributedSampler

from medaug import vocab
from medaug.errors import ConfigError, LabelError
from medaug.monai import MixedDataset, Names, SliceDataset, SyntheticDataset, annotating_domains, intensity_mappings

PROSTATE_NAMES = {"prostate", "prostate_peripheral_zone", "prostate_transition_zone"}


def index_rows(root: Path, name: str = "index.parquet") -> dict[str, dict]:
    """slice_id → row, read with pyarrow alone."""
    return {row["slice_id"]: row for row in pq.read_table(root / name).to_pylist()}


def shard_pixels(root: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """The row's stored (C, H, W) float32 image and (H, W) uint8 label, read with numpy."""
    image = np.load(root / f"{row['shard']}.image.npy")[row["shard_row"]].astype(np.float32)
    label = np.load(root / f"{row['shard']}.label.npy")[row["shard_row"]]
    return image, label


# ---------------------------------------------------------------- items

@pytest.mark.parametrize("channels", ["domain", "max"])
def test_slice_items_equal_the_index_and_the_shards(prepared_dir, channels):
    rows = index_rows(prepared_dir)
    dataset = SliceDataset(prepared_dir, split="val", channels=channels)
    assert sorted(item_id for item_id, row in rows.items() if row["split"] == "val") == sorted(
        dataset[i]["slice_id"] for i in range(len(dataset)))
    for position in range(len(dataset)):
        item = dataset[position]
        row = rows[item["slice_id"]]
        stored_image, stored_label = shard_pixels(prepared_dir, row)
        domain_channels = len(row["channels"])
        expected_channels = domain_channels if channels == "domain" else 2
        image, label = item["image"], item["label"]
        assert isinstance(image, MetaTensor) and isinstance(label, MetaTensor)
        assert image.dtype == torch.float32 and tuple(image.shape) == (expected_channels, 64, 64)
        assert label.dtype == torch.uint8 and tuple(label.shape) == (1, 64, 64)
        np.testing.assert_array_equal(image.numpy()[:domain_channels], stored_image)
        assert not image.numpy()[domain_channels:].any()
        np.testing.assert_array_equal(label.numpy()[0], stored_label)
        padding = expected_channels - domain_channels
        assert item["channel_mask"].tolist() == [True] * domain_channels + [False] * padding
        assert item["domain"] == row["domain"] and item["structures"] == tuple(row["structures_present"])
        for tensor in (image, label):
            np.testing.assert_array_equal(tensor.affine.numpy(), np.reshape(row["affine"], (4, 4)))
            assert tensor.meta["filename_or_obj"] == row["slice_id"]
            np.testing.assert_allclose(tensor.meta["spacing"].numpy(), row["spacing_mm"])
            assert intensity_mappings(tensor.meta["intensity"]) == json.loads(row["intensity"])
            assert tensor.meta["channels"] == tuple(row["channels"]) and tensor.meta["plane"] == row["plane"]
            assert tensor.meta["structures_annotated"] == tuple(row["structures_annotated"])
            assert tensor.meta["synthetic"] is False and tensor.meta["seed"] == -1


@pytest.mark.parametrize("kwargs, keep", [
    ({"domains": "mr/prostate"}, lambda row: row["domain"] == "mr/prostate"),
    ({"split": ["train", "test"]}, lambda row: row["split"] in ("train", "test")),
    ({"structures": "prostate"}, lambda row: bool(PROSTATE_NAMES & set(row["structures_present"]))),
    ({"structures": ["kidney_left"], "split": "test"},
     lambda row: "kidney_left" in row["structures_present"] and row["split"] == "test"),
], ids=["domain", "splits", "structure-through-hierarchy", "structure-and-split"])
def test_filters_keep_the_rows_an_independent_query_keeps(prepared_dir, kwargs, keep):
    expected = sorted(slice_id for slice_id, row in index_rows(prepared_dir).items() if keep(row))
    dataset = SliceDataset(prepared_dir, channels="max", **kwargs)
    assert expected and sorted(dataset[i]["slice_id"] for i in range(len(dataset))) == expected


def test_classes_are_consecutive_ids_and_ignore_where_a_row_does_not_annotate_them(prepared_dir):
    rows = index_rows(prepared_dir)
    dataset = SliceDataset(prepared_dir, split="val", channels="max", classes=["prostate", "urinary_bladder"])
    bladder_id = vocab.structure("urinary_bladder").id
    prostate_ids = [vocab.structure(name).id for name in PROSTATE_NAMES]
    assert dataset.class_names == ("urinary_bladder", "prostate")  # vocabulary-id order: 21 < 22
    checked = set()
    for position in range(len(dataset)):
        item = dataset[position]
        row = rows[item["slice_id"]]
        _, raw = shard_pixels(prepared_dir, row)
        if row["domain"] == "mr/prostate":  # annotates both classes (the prostate through its two zones)
            expected = np.where(np.isin(raw, prostate_ids), 2, np.where(raw == bladder_id, 1, 0))
        else:  # CT abdomen annotates neither: its background is unknown, its organs are not the classes
            expected = np.where(raw == 0, 255, 0)
        np.testing.assert_array_equal(item["label"].numpy()[0], expected)
        checked.add((row["domain"], bool((expected == 2).any())))
    assert {("mr/prostate", True), ("ct/abdomen", False)} <= checked


def test_synthetic_items_carry_the_manifest_and_the_batch_shards(synthetic_dir):
    rows = index_rows(synthetic_dir, "manifest.parquet")
    domain_items = SyntheticDataset(synthetic_dir)
    max_items = SyntheticDataset(synthetic_dir, channels="max")
    assert len(domain_items) == len(rows) == len(max_items)
    for position in range(len(domain_items)):
        item, padded = domain_items[position], max_items[position]
        row = rows[item["slice_id"]]
        stored_image, stored_label = shard_pixels(synthetic_dir, row)  # (C_max, H, W): zeros past the domain
        channels = len(row["channels"])
        np.testing.assert_array_equal(item["image"].numpy(), stored_image[:channels])
        np.testing.assert_array_equal(padded["image"].numpy(), stored_image)
        np.testing.assert_array_equal(item["label"].numpy()[0], stored_label)
        meta = item["image"].meta
        assert meta["synthetic"] is True and meta["seed"] == row["seed"] and meta["sample_id"] == row["sample_id"]
        assert meta["condition_present"] == tuple(row["condition_present"])
        assert meta["condition_annotated"] == tuple(row["condition_annotated"])
        np.testing.assert_array_equal(item["label"].affine.numpy(), np.reshape(row["affine"], (4, 4)))


def test_synthetic_dataset_refuses_a_prepared_folder_and_bad_options(prepared_dir, synthetic_dir):
    with pytest.raises(ConfigError, match="manifest.parquet"):
        SyntheticDataset(prepared_dir)
    with pytest.raises(ConfigError, match="channels"):
        SliceDataset(prepared_dir, channels="all")
    with pytest.raises(ConfigError, match="classes"):
        SliceDataset(prepared_dir, classes=[])
    with pytest.raises(LabelError, match="prostrate"):
        SyntheticDataset(synthetic_dir, classes=["prostrate"])


def test_annotating_domains_are_the_domains_whose_rows_cover_the_classes(prepared_dir):
    by_domain: dict[str, set[str]] = {}
    for row in index_rows(prepared_dir).values():
        by_domain.setdefault(row["domain"], set()).update(row["structures_annotated"])
    zones = {"prostate_peripheral_zone", "prostate_transition_zone"}  # both children: the prostate is covered
    assert annotating_domains(prepared_dir, ["prostate"]) == sorted(
        domain for domain, names in by_domain.items() if zones <= names)
    assert annotating_domains(prepared_dir, ["liver"]) == ["ct/abdomen"]
    assert annotating_domains(prepared_dir, ["liver", "prostate"]) == []


# ---------------------------------------------------------------- MONAI transforms

def label_encoding_transforms(seed: int, image_mode: str) -> Compose:
    """Replace the image by the label (so image intensity encodes it), then augment as a training loop would."""
    transforms = Compose([
        DeleteItemsd(keys="image"),
        CopyItemsd(keys="label", names="image"),
        CastToTyped(keys="image", dtype=torch.float32),
        RandAffined(keys=["image", "label"], prob=1.0, rotate_range=0.6, translate_range=(4, 4),
                    scale_range=(0.15, 0.15), mode=(image_mode, "nearest"), padding_mode="zeros"),
        RandGaussianNoised(keys="image", prob=1.0, std=0.05, sample_std=False),
    ])
    transforms.set_random_state(seed)
    return transforms


def world_centroids(label_HW: np.ndarray, affine_44: np.ndarray, max_radius: float) -> dict[int, np.ndarray]:
    """Pixel (row, col, 0, 1) and RAS (mm) centroids, stacked (2, 4), of every id whose pixels lie within
    ``max_radius`` pixels of the slice centre."""
    centre = (np.array(label_HW.shape) - 1) / 2
    centroids = {}
    for value in np.unique(label_HW):
        rows, cols = np.nonzero(label_HW == value)
        if value == 0 or len(rows) < 12 or np.hypot(rows - centre[0], cols - centre[1]).max() > max_radius:
            continue
        pixel = np.array([rows.mean(), cols.mean(), 0.0, 1.0])
        centroids[int(value)] = np.stack([pixel, affine_44 @ pixel])
    return centroids


def locally_constant(label_HW: np.ndarray) -> np.ndarray:
    """(H, W) bool: the 3x3 neighbourhood holds one value (where bilinear and nearest resampling agree)."""
    return ndimage.maximum_filter(label_HW, size=3) == ndimage.minimum_filter(label_HW, size=3)


@pytest.mark.parametrize("image_mode", ["nearest", "bilinear"])
def test_rand_affine_moves_the_label_with_the_image_and_the_affine_follows(prepared_dir, image_mode):
    plain = SliceDataset(prepared_dir, split="val", channels="max")
    moved = SliceDataset(prepared_dir, split="val", channels="max", transform=label_encoding_transforms(7, image_mode))
    moved_centroids = 0
    for position in range(len(plain)):
        before, after = plain[position], moved[position]
        label_in, label_out = before["label"].numpy()[0], after["label"].numpy()[0]
        image_out = after["image"].numpy()[0]
        assert set(np.unique(label_out)) <= set(np.unique(label_in))  # nearest: no blended ids
        assert np.mean(label_out[label_in > 0] != label_in[label_in > 0]) > 0.1  # the transform moved things
        same_motion, interior = np.round(image_out) == label_out, locally_constant(label_out)
        assert same_motion.all() if image_mode == "nearest" else same_motion[interior].mean() > 0.995
        assert 0.04 < float((image_out - label_out)[same_motion & interior].std()) < 0.06  # noise on the image only
        assert np.array_equal(label_out, np.round(label_out))  # ... the label stays integral
        spacing_mm = float(before["label"].meta["spacing"][0])
        centroids_in = world_centroids(label_in, before["label"].affine.numpy(), max_radius=20)
        centroids_out = world_centroids(label_out, after["label"].affine.numpy(), max_radius=31)
        for value in centroids_in.keys() & centroids_out.keys():  # same RAS place, within nearest-pixel rounding
            (pixel_in, world_in), (pixel_out, world_out) = centroids_in[value], centroids_out[value]
            assert np.linalg.norm(world_in - world_out) < spacing_mm
            moved_centroids += np.linalg.norm(pixel_in - pixel_out) > 2.0
        np.testing.assert_array_equal(after["image"].affine.numpy(), after["label"].affine.numpy())
    assert moved_centroids >= 10  # structures that moved over 2 pixels and stayed in place in RAS


def test_cache_dataset_keeps_the_reads_and_redraws_random_transforms(prepared_dir):
    rows = index_rows(prepared_dir)
    dataset = SliceDataset(prepared_dir, split="val", domains="mr/prostate")
    noise = RandGaussianNoised(keys="image", prob=1.0, std=0.1, sample_std=False)
    cached = CacheDataset(dataset, transform=noise, progress=False)
    assert cached.cache_num == len(dataset) > 0
    for position in range(len(dataset)):
        first, second = cached[position], cached[position]
        stored_image, stored_label = shard_pixels(prepared_dir, rows[first["slice_id"]])
        np.testing.assert_array_equal(first["label"].numpy()[0], stored_label)
        assert 0.08 < float((first["image"].numpy() - stored_image).std()) < 0.12
        assert not torch.equal(first["image"], second["image"])
    batch = next(iter(DataLoader(cached, batch_size=4)))
    assert tuple(batch["image"].shape) == (4, 2, 64, 64) and tuple(batch["image"].affine.shape) == (4, 4, 4)


def test_names_batch_as_one_tuple_per_item_with_plain_torch_collate(prepared_dir):
    rows = index_rows(prepared_dir)
    dataset = SliceDataset(prepared_dir, split="val", domains="mr/prostate")
    batch = next(iter(TorchDataLoader(dataset, batch_size=6)))
    expected = [tuple(rows[slice_id]["structures_present"]) for slice_id in batch["slice_id"]]
    assert batch["structures"] == expected and len({len(names) for names in expected}) > 1
    assert all(isinstance(names, Names) for names in batch["structures"])


# ---------------------------------------------------------------- mixing

@pytest.mark.parametrize("fraction, length, expected", [
    (0.5, None, (20, 20)), (0.2, None, (20, 5)), (1.0, None, (0, 20)), (0.0, None, (20, 0)), (0.3, 10, (7, 3)),
], ids=["half", "fifth", "all-synthetic", "all-real", "fixed-length"])
def test_mixed_counts_follow_the_fraction(fraction, length, expected):
    real, synthetic = list(range(20)), list(range(100, 120))
    mixed = MixedDataset(real, synthetic, fraction, length=length)
    drawn = [mixed[i] for i in range(len(mixed))]
    assert (mixed.n_real, mixed.n_synthetic) == expected == (sum(v < 100 for v in drawn), sum(v >= 100 for v in drawn))


def test_mixed_epochs_walk_through_every_synthetic_sample_once():
    real, synthetic = list(range(20)), list(range(100, 120))
    mixed = MixedDataset(real, synthetic, synthetic_fraction=0.2, seed=4)  # 20 real + 5 synthetic per epoch
    seen_synthetic = []
    for epoch in range(4):
        mixed.set_epoch(epoch)
        drawn = [mixed[i] for i in range(len(mixed))]
        assert sorted(v for v in drawn if v < 100) == real  # every real item once per epoch
        seen_synthetic += [v for v in drawn if v >= 100]
    assert sorted(seen_synthetic) == synthetic


def test_mixed_refuses_bad_fractions_empty_parts_and_unequal_channels(prepared_dir, synthetic_dir):
    with pytest.raises(ConfigError, match="synthetic_fraction"):
        MixedDataset([1], [2], 1.5)
    with pytest.raises(ConfigError, match="synthetic"):
        MixedDataset([1, 2], [], 0.5)
    real = SliceDataset(prepared_dir, split="train", domains="mr/prostate")  # 2 channels
    ct_only = SyntheticDataset(synthetic_dir, domains="ct/abdomen")  # 1 channel
    with pytest.raises(ConfigError, match="channels"):
        MixedDataset(real, ct_only, 0.5)


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in-order"])
def test_distributed_sampler_shards_the_mix_disjointly_and_keeps_the_ratio(prepared_dir, synthetic_dir, shuffle):
    train_ids = {slice_id for slice_id, row in index_rows(prepared_dir).items() if row["split"] == "train"}
    synthetic_ids = set(index_rows(synthetic_dir, "manifest.parquet"))
    real = SliceDataset(prepared_dir, split="train", channels="max")
    mixed = MixedDataset(real, SyntheticDataset(synthetic_dir, channels="max"), synthetic_fraction=1 / 3, seed=2)
    assert (mixed.n_real, mixed.n_synthetic) == (len(train_ids), len(train_ids) // 2)
    shares, items = [], []
    for rank in range(2):
        sampler = DistributedSampler(mixed, num_replicas=2, rank=rank, shuffle=shuffle, seed=5)
        sampler.set_epoch(1)
        shares.append(list(sampler))
        loader = DataLoader(mixed, batch_size=5, sampler=sampler, num_workers=2 if rank == 0 else 0)
        items.append([(flag, slice_id) for batch in loader
                      for flag, slice_id in zip(batch["image"].meta["synthetic"].tolist(), batch["slice_id"])])
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(len(mixed)))
    for rank in range(2):  # what each rank read is what the layout says its positions are
        assert [flag for flag, _ in items[rank]] == [bool(mixed.is_synthetic_L[i]) for i in shares[rank]]
    everything = items[0] + items[1]
    assert sum(flag for flag, _ in everything) == mixed.n_synthetic  # exactly the fraction over all ranks
    assert sorted(slice_id for flag, slice_id in everything if not flag) == sorted(train_ids)  # each real once
    assert {slice_id for flag, slice_id in everything if flag} <= synthetic_ids


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in-order"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_gets_about_the_fraction(shuffle, world_size):
    mixed = MixedDataset(list(range(200)), list(range(1000, 1200)), synthetic_fraction=0.25, length=1200, seed=1)
    fractions = []
    for rank in range(world_size):
        sampler = DistributedSampler(mixed, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=9)
        fractions.append(np.mean([mixed[index] >= 1000 for index in sampler]))
    # hypergeometric: 400-600 draws at 1/4 have a standard deviation of 0.013-0.017
    assert np.allclose(fractions, 0.25, atol=0.06) and np.isclose(np.mean(fractions), 0.25)
