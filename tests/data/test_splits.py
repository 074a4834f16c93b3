"""Fingerprints, patient-group merging and split assignment."""

from __future__ import annotations

import functools
import hashlib
import itertools

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter

from medaug.data.index import read_index, write_index
from medaug.data.shards import ShardWriter, assemble_index
from medaug.data.splits import (
    DEFAULT_MAX_DISTANCE,
    FINGERPRINT_BYTES,
    _near_pairs,
    area_resize,
    assign_splits,
    hamming,
    merge_patient_groups,
    slice_fingerprint,
    split_index,
)
from medaug.errors import ConfigError
from tests.data.conftest import make_rows


@functools.lru_cache(maxsize=64)
def _texture(patient: int, size: int) -> np.ndarray:
    return gaussian_filter(np.random.default_rng(patient).normal(size=(size, size)), size / 40)


def phantom_slice(z_mm: float, patient: int, size: int = 256) -> np.ndarray:
    """A CT-like abdominal slice in model space [-1, 1]: body, organs whose size varies with z, texture."""
    centres = np.random.default_rng(patient + 1000).uniform(-0.4, 0.4, size=(4, 2))
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    image = np.full((size, size), -1.0)
    body = (x / 0.85) ** 2 + (y / 0.6) ** 2 < 1
    image[body] = -0.1 + 1.6 * _texture(patient, size)[body]
    for (cx, cy), level, radius in zip(centres, (0.5, 0.2, -0.4, 0.8), (0.25, 0.15, 0.12, 0.06)):
        r = radius * (1 + 0.5 * np.sin(z_mm / 15 + cx * 5))
        image[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = level
    return np.clip(image, -1, 1)


def repackaged(image_HW: np.ndarray, seed: int) -> np.ndarray:
    """The same slice through another pipeline: 1 % noise, stored as int16 HU, read back."""
    noisy = image_HW + np.random.default_rng(seed).normal(0, 0.01, image_HW.shape)
    hu = np.round((noisy + 1) / 2 * 400 - 160).astype(np.int16)  # window [-160, 240] HU
    return np.clip((hu.astype(np.float32) + 160) / 400 * 2 - 1, -1, 1)


def test_area_resize_is_the_block_mean_and_keeps_the_mean():
    image = np.random.default_rng(0).normal(size=(64, 96))
    expected = image.reshape(32, 2, 32, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(area_resize(image, 32), expected, atol=1e-12)
    odd = np.random.default_rng(1).normal(size=(50, 37))
    assert area_resize(odd, 32).mean() == pytest.approx(odd.mean(), abs=1e-12)


def test_fingerprint_tolerates_noise_quantization_and_dtype():
    for z, patient in [(0.0, 1), (40.0, 2), (-25.0, 3)]:
        original = phantom_slice(z, patient)
        fingerprint = slice_fingerprint(original)
        assert len(fingerprint) == FINGERPRINT_BYTES
        assert hamming(fingerprint, slice_fingerprint(repackaged(original, seed=patient))) <= DEFAULT_MAX_DISTANCE
        assert hamming(fingerprint, slice_fingerprint(original.astype(np.float16))) <= 2


def test_fingerprint_is_invariant_to_brightness_and_contrast():
    original = phantom_slice(10.0, 4)
    assert slice_fingerprint(original) == slice_fingerprint(0.5 * original + 0.2)


def test_different_slices_and_patients_do_not_match():
    reference = slice_fingerprint(phantom_slice(0.0, 1))
    others = [phantom_slice(30.0, 1), phantom_slice(0.0, 2), phantom_slice(0.0, 5), np.flipud(phantom_slice(0.0, 1))]
    for other in others:
        assert hamming(reference, slice_fingerprint(other)) > 3 * DEFAULT_MAX_DISTANCE


def test_flat_slice_has_no_fingerprint():
    assert slice_fingerprint(np.full((256, 256), -1.0)) == b""
    assert slice_fingerprint(np.full((256, 256), -1.0) + np.random.default_rng(0).normal(0, 0.01, (256, 256))) == b""


@pytest.mark.real
def test_real_brains_copy_matches_other_patient_does_not(real_dir):
    import nibabel as nib

    def model_space(path):
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        sample = volume[::2, ::2, ::2]
        low, high = np.percentile(sample[sample != 0], [0.5, 99.5])
        return np.clip((volume - low) / (high - low) * 2 - 1, -1, 1)

    first = model_space(real_dir / "brats2013/pat0005/Flair_subtrMeanDivStd.nii.gz")
    second = model_space(real_dir / "brats2013/pat0006/Flair_subtrMeanDivStd.nii.gz")
    others = {j: slice_fingerprint(second[:, :, j]) for j in range(36, 125)}
    copy_distances, cross_distances = [], []
    for k in range(40, 120, 8):  # brain slices; both volumes are on one 240x240x155 template grid
        original = slice_fingerprint(first[:, :, k])
        copy_distances.append(hamming(original, slice_fingerprint(repackaged(first[:, :, k], seed=k))))
        cross_distances.append(min(hamming(original, others[j]) for j in range(k - 4, k + 5)))
    assert max(copy_distances) <= DEFAULT_MAX_DISTANCE
    assert min(cross_distances) > DEFAULT_MAX_DISTANCE


def test_near_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(300, FINGERPRINT_BYTES), dtype=np.uint8)
    near = base[:40].copy()
    for row in range(40):  # flip 1..16 bits: some within the threshold, some beyond
        for bit in rng.choice(256, size=1 + row % 16, replace=False):
            near[row, bit // 8] ^= np.uint8(1 << (bit % 8))
    fingerprints = np.concatenate([base, near, base[:5]])  # also exact copies
    owner = np.arange(len(fingerprints)) // 3  # 3 slices per volume
    words = np.frombuffer(fingerprints.tobytes(), dtype=">u8").astype(np.uint64).reshape(len(fingerprints), 4)
    first, second = _near_pairs(words, owner, DEFAULT_MAX_DISTANCE)
    bits = np.unpackbits(fingerprints, axis=1)
    expected = set()
    for i, j in itertools.combinations(range(len(fingerprints)), 2):
        if owner[i] != owner[j] and np.count_nonzero(bits[i] != bits[j]) <= DEFAULT_MAX_DISTANCE:
            expected.add((i, j) if owner[i] < owner[j] else (j, i))
    assert set(zip(first.tolist(), second.tolist())) == expected
    assert len(expected) >= 5 + 20  # the planted pairs are there


@pytest.mark.parametrize("max_distance", [0, 3], ids=["exact", "three-bits"])
def test_near_pairs_small_thresholds(max_distance):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, size=(20, FINGERPRINT_BYTES), dtype=np.uint8)
    shifted = base.copy()
    shifted[:, 0] ^= np.uint8(0b111)  # exactly 3 bits away
    fingerprints = np.concatenate([base, base[:4], shifted[:6]])
    owner = np.arange(len(fingerprints))
    words = np.frombuffer(fingerprints.tobytes(), dtype=">u8").astype(np.uint64).reshape(len(fingerprints), 4)
    first, second = _near_pairs(words, owner, max_distance)
    exact = {(k, 20 + k) for k in range(4)}
    three = {(k, 24 + k) for k in range(6)} | {(20 + k, 24 + k) for k in range(4)}
    assert set(zip(first.tolist(), second.tolist())) == (exact if max_distance == 0 else exact | three)


def test_fingerprint_refuses_a_channel_stack():
    with pytest.raises(ValueError, match="one \\(H, W\\) slice"):
        slice_fingerprint(np.zeros((2, 64, 64)))


def _volume_fingerprints(patient: int, z_values) -> list[bytes]:
    return [slice_fingerprint(phantom_slice(z, patient)) for z in z_values]


def test_merge_joins_copies_across_datasets_and_keeps_others_apart():
    z_values = np.arange(0, 60, 6.0)
    copy = [slice_fingerprint(repackaged(phantom_slice(z, 1), seed=int(z))) for z in z_values]
    volumes = pd.DataFrame({
        "volume_id": ["brats-1", "msd-1", "brats-2", "brats-1-t1"],
        "patient_group": ["brats:pat1", "msd:case1", "brats:pat2", "brats:pat1"],
        "fingerprints": [_volume_fingerprints(1, z_values), copy, _volume_fingerprints(2, z_values), []],
    })
    merged = merge_patient_groups(volumes)
    assert merged == {
        "brats-1": "brats:pat1+msd:case1", "msd-1": "brats:pat1+msd:case1",
        "brats-2": "brats:pat2", "brats-1-t1": "brats:pat1+msd:case1",
    }


def test_merge_needs_enough_shared_slices():
    z_values = np.arange(0, 60, 6.0)  # 10 slices each
    one_shared = _volume_fingerprints(3, z_values[:9]) + _volume_fingerprints(1, z_values[:1])
    small = _volume_fingerprints(1, z_values[5:7])  # 2 slices, 2 shared with patient 1: 100 % of the smaller
    two_of_ten = _volume_fingerprints(1, z_values[:2]) + _volume_fingerprints(4, z_values[2:])
    volumes = pd.DataFrame({
        "volume_id": ["p1", "one", "small", "two"],
        "patient_group": ["g1", "g-one", "g-small", "g-two"],
        "fingerprints": [_volume_fingerprints(1, z_values), one_shared, small, two_of_ten],
    })
    merged = merge_patient_groups(volumes)
    assert merged["one"] == "g-one"  # 1 slice of 10: below 3 slices and below 30 %
    assert merged["two"] == "g-two"  # 2 of 10: still below both
    assert merged["small"] == merged["p1"] == "g-small+g1"
    assert merge_patient_groups(volumes, min_slices=2)["two"] == "g-small+g-two+g1"


def test_merge_accepts_index_rows_one_per_slice():
    z_values = np.arange(0, 30, 6.0)
    first, second = _volume_fingerprints(1, z_values), _volume_fingerprints(1, z_values)
    rows = pd.DataFrame({
        "volume_id": ["v1"] * 5 + ["v2"] * 5 + ["v3"] * 5,
        "patient_group": ["g1"] * 5 + ["g2"] * 5 + ["g3"] * 5,
        "fingerprint": first + second + _volume_fingerprints(2, z_values),
    })
    assert merge_patient_groups(rows) == {"v1": "g1+g2", "v2": "g1+g2", "v3": "g3"}


def test_merge_is_transitive():
    shared = _volume_fingerprints(1, np.arange(0, 36, 6.0))  # 6 slices
    first = shared[:3] + _volume_fingerprints(7, [90.0])
    last = _volume_fingerprints(8, [0.0]) + shared[3:]  # nothing in common with ``first``
    volumes = pd.DataFrame({
        "volume_id": ["a", "b", "c"],
        "patient_group": ["ga", "gb", "gc"],
        "fingerprints": [first, shared, last],
    })
    assert set(merge_patient_groups(volumes).values()) == {"ga+gb+gc"}
    assert set(merge_patient_groups(volumes.drop(index=1)).values()) == {"ga", "gc"}


def _point(group: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64


def test_assign_splits_follows_the_hash_formula_and_is_stable():
    groups = [f"subject-{n}" for n in range(3000)]
    splits = assign_splits(groups, (0.7, 0.2, 0.1), seed=4)
    for group in groups[:200]:
        point = _point(group, 4)
        assert splits[group] == ("train" if point < 0.7 else "val" if point < 0.9 else "test")
    counts = pd.Series(splits).value_counts(normalize=True)
    assert counts["train"] == pytest.approx(0.7, abs=0.03) and counts["test"] == pytest.approx(0.1, abs=0.03)
    assert assign_splits(groups, (0.7, 0.2, 0.1), seed=4) == splits
    grown = assign_splits(groups + [f"new-{n}" for n in range(500)], (0.7, 0.2, 0.1), seed=4)
    assert all(grown[group] == splits[group] for group in groups)
    assert assign_splits(groups, (0.7, 0.2, 0.1), seed=5) != splits


def test_pins_win_and_pin_whole_groups():
    members = {"brats:pat1+msd:case1": ["brats:pat1", "msd:case1", "pat1"], "other": ["other"]}
    pinned = {"msd:case1": "test", "other": "val"}
    splits = assign_splits(list(members), seed=0, pinned=pinned, members=members)
    assert splits == {"brats:pat1+msd:case1": "test", "other": "val"}


def test_pin_on_a_pre_merge_group_moves_the_merged_group():
    splits = assign_splits(["brats:pat1+msd:case1", "x"], pinned={"msd:case1": "test", "x": "val"})
    assert splits == {"brats:pat1+msd:case1": "test", "x": "val"}


def test_conflicting_pins_in_one_group_are_named():
    members = {"a+b": ["a", "b"]}
    with pytest.raises(ConfigError, match="conflicting pins {'a': 'train', 'b': 'test'}"):
        assign_splits(["a+b"], pinned={"a": "train", "b": "test"}, members=members)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"fractions": (0.8, 0.1)}, "fractions"),
        ({"fractions": (0.8, 0.3, -0.1)}, "fractions"),
        ({"fractions": (0.5, 0.1, 0.1)}, "fractions"),
        ({"pinned": {"g": "holdout"}}, "pinned"),
    ],
    ids=["two-fractions", "negative", "sum", "bad-pin"],
)
def test_bad_split_options_fail_naming_the_field(options, expected):
    with pytest.raises(ConfigError, match=expected):
        assign_splits(["g"], **options)


def test_unknown_pin_is_logged(caplog):
    assign_splits(["g"], pinned={"nobody": "test"})
    assert "['nobody']" in caplog.text and "ignored" in caplog.text


def test_split_index_merges_groups_and_never_splits_one(tmp_path):
    writer = ShardWriter(tmp_path, fsync=False)
    z_values = np.arange(0, 48, 6.0)
    volumes = [("0000000000000001", 1, "brats:pat1", False), ("0000000000000002", 1, "msd:case1", True)]
    volumes += [(f"{10 + n:016x}", 10 + n, f"brats:pat{10 + n}", False) for n in range(30)]
    for volume_id, patient, group, noisy in volumes:
        slices = [phantom_slice(z, patient, size=64) for z in z_values]
        slices = [repackaged(s, seed=k) if noisy else s for k, s in enumerate(slices)]
        images = np.stack(slices)[:, None].astype(np.float32)
        rows = make_rows(volume_id, len(z_values), ["ct"], split=None, group=group)
        for row, image in zip(rows, slices):
            row["fingerprint"] = slice_fingerprint(image)
        writer.write_volume(volume_id, images, None, rows)
    table = split_index(assemble_index(tmp_path), fractions=(0.5, 0.25, 0.25), seed=1,
                        pinned={"subject-0000000000000002": "val"})
    frame = table.select(["volume_id", "patient_group", "split"]).to_pandas()
    assert frame.groupby("patient_group")["split"].nunique().max() == 1  # one split per group
    copies = frame[frame["volume_id"].isin(["0000000000000001", "0000000000000002"])]
    assert set(copies["patient_group"]) == {"brats:pat1+msd:case1"}
    assert set(copies["split"]) == {"val"}  # the pin on one copy's subject moved both
    assert frame["patient_group"].nunique() == 31
    assert set(frame["split"]) == {"train", "val", "test"}
    path = write_index(table, tmp_path / "index.parquet")
    assert read_index(path).column("split").null_count == 0


def test_tiny_domains_get_a_val_and_a_test_group():
    from medaug.data.splits import assign_splits, fill_empty_splits

    groups = [f"g{index}" for index in range(200)]
    hashed = assign_splits(groups, seed=0)
    # find 4 groups that the hash puts in train: the unlucky tiny dataset
    tiny = [group for group in groups if hashed[group] == "train"][:4]
    splits = {group: hashed[group] for group in tiny}
    fill_empty_splits(splits, tiny, (0.8, 0.1, 0.1), 0, fixed=set())
    assert sorted(splits.values()) == ["test", "train", "train", "val"]
    pinned = dict(splits)
    fill_empty_splits(pinned, tiny, (0.8, 0.1, 0.1), 0, fixed=set(tiny))  # nothing movable: unchanged
    assert pinned == splits
    large = dict(hashed)
    fill_empty_splits(large, groups, (0.8, 0.1, 0.1), 0, fixed=set())
    assert large == hashed  # enough groups: the hash splits stand
