"""Patient groups and splits: slice fingerprints, cross-dataset group merging, deterministic splits.

The same scan can reach one prepared dataset through two sources (MSD Task01 is BraTS, Task03 is LiTS,
KiTS19 is inside KiTS21). Harmonization puts both copies on the same RAS grid, spacing and intensity
scale, so a perceptual hash of each harmonized slice (:func:`slice_fingerprint`) matches across the
copies whatever their file format, dtype or packaging was. :func:`merge_patient_groups` joins the
patient groups of volumes that share near-identical slices; :func:`assign_splits` then draws one split
per merged group from a hash of (seed, group name), so a group keeps its split when others are added.

Fingerprint: the slice (first channel, model space [-1, 1]) is area-averaged to 32 x 32, its 2D DCT
taken, and the 256 lowest-frequency coefficients after DC (ordered by u + v, then u) are compared with
their median: 256 bits, 32 bytes. Dropping DC and thresholding at the median makes the hash invariant
to a brightness offset and a contrast scale; averaging 8 x 8-pixel cells (at 256²) makes it insensitive
to noise and quantization. A slice whose thumbnail is nearly flat (standard deviation below
``FLAT_STD``, e.g. air above the head) has no usable fingerprint: the empty ``b""``, never matched.

Why 256 bits and 12 bits of tolerance. On the two real BraTS brains in ``shared/real`` (two patients
registered to one template, so corresponding slices look alike: the hard case), a copy of each slice
with 1 % noise and int16 quantization stayed within 6 bits (99th percentile 3), while the closest
slice of the other patient was 24 bits away (0.1st percentile 52). A 64-bit hash of a 16 x 16
thumbnail was too coarse: some slices of different patients came within 2 bits.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.fft

from medaug.data.index import SPLITS
from medaug.errors import ConfigError

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 32
FINGERPRINT_BITS = 256
FINGERPRINT_BYTES = FINGERPRINT_BITS // 8
FLAT_STD = 0.02  # model-space units: thumbnails flatter than this carry no fingerprint
DEFAULT_MAX_DISTANCE = 12  # Hamming bits (of 256) for "near-identical"
DEFAULT_MIN_SLICES = 3
DEFAULT_MIN_FRACTION = 0.3


def area_resize(image_HW: np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """Area-average ``image_HW`` to (size, size) float64: each output pixel is the mean of the input
    area it covers (fractional pixel overlaps weighted), for any H, W >= 1."""
    image_HW = np.asarray(image_HW, dtype=np.float64)
    rows_SH = _area_weights(image_HW.shape[0], size)
    cols_SW = _area_weights(image_HW.shape[1], size)
    return rows_SH @ image_HW @ cols_SW.T  # (size, size)


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix whose row i averages the input interval [i, i + 1) * n_in / n_out."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    starts, ends = edges[:-1, None], edges[1:, None]
    pixel = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(ends, pixel + 1) - np.maximum(starts, pixel), 0.0, None)
    return overlap / (n_in / n_out)


def _low_frequency_order(size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) indices of the ``count`` lowest DCT frequencies after DC, ordered by u + v, then u."""
    pairs = sorted(((u, v) for u in range(size) for v in range(size)), key=lambda p: (p[0] + p[1], p[0]))
    chosen = pairs[1 : count + 1]
    return np.array([p[0] for p in chosen]), np.array([p[1] for p in chosen])


_ROWS, _COLS = _low_frequency_order(THUMBNAIL_SIZE, FINGERPRINT_BITS)


def slice_fingerprint(image_HW: np.ndarray) -> bytes:
    """32-byte (256-bit) perceptual hash of one harmonized slice (H, W), model space [-1, 1], any dtype.

    Returns ``b""`` for a nearly flat slice (nothing to recognize it by). Compare two fingerprints with
    :func:`hamming`: copies of one scan differ by a few bits, unrelated slices by about half of them.
    """
    if np.ndim(image_HW) != 2:
        raise ValueError(f"slice_fingerprint takes one (H, W) slice, got shape {np.shape(image_HW)}")
    thumbnail = area_resize(image_HW)
    if not np.all(np.isfinite(thumbnail)) or thumbnail.std() < FLAT_STD:
        return b""
    coefficients = scipy.fft.dctn(thumbnail, norm="ortho")[_ROWS, _COLS]  # (FINGERPRINT_BITS,)
    bits = coefficients > np.median(coefficients)
    return np.packbits(bits).tobytes()


def hamming(first: bytes, second: bytes) -> int:
    """Number of differing bits between two equal-length fingerprints."""
    if len(first) != len(second):
        raise ValueError(f"fingerprints of {len(first)} and {len(second)} bytes cannot be compared")
    xor = np.bitwise_xor(np.frombuffer(first, np.uint8), np.frombuffer(second, np.uint8))
    return int(np.unpackbits(xor).sum())


def _fingerprint_words(fingerprints: Sequence[bytes]) -> np.ndarray:
    """(N, FINGERPRINT_BYTES // 8) uint64 words of fingerprints (big-endian: bit order matches the bytes)."""
    words = np.frombuffer(b"".join(fingerprints), dtype=">u8").astype(np.uint64)
    return words.reshape(len(fingerprints), FINGERPRINT_BYTES // 8)


def _popcount(words_NW: np.ndarray) -> np.ndarray:
    """(N,) set bits per row of uint64 words (numpy < 2 has no bitwise_count)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words_NW).sum(axis=1).astype(np.int64)
    return np.unpackbits(words_NW.view(np.uint8), axis=1).sum(axis=1).astype(np.int64)


def _band_keys(words_NW: np.ndarray, bands: int) -> list[np.ndarray]:
    """Per band, (N,) int64: the value of that band's bits (``bands`` near-equal runs of the hash bits)."""
    bits_NB = np.unpackbits(words_NW.astype(">u8").view(np.uint8).reshape(len(words_NW), -1), axis=1)
    keys = []
    for columns in np.array_split(np.arange(FINGERPRINT_BITS), bands):
        weights = (1 << np.arange(len(columns), dtype=np.int64))[::-1]
        keys.append(bits_NB[:, columns].astype(np.int64) @ weights)
    return keys


def _near_pairs(words_NW: np.ndarray, owner_N: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) with owner[i] < owner[j] whose fingerprints differ in <= ``max_distance`` bits.

    Multi-index hashing: cut the bits into at least ``max_distance + 1`` bands; by pigeonhole, two
    fingerprints within that distance agree exactly on at least one band, so only fingerprints sharing a
    band value are compared. The work is the number of such candidate pairs, not N^2; identical copies
    (the common case) collide in every band and are found at once.
    """
    bands = max(max_distance + 1, -(-FINGERPRINT_BITS // 62))  # a band key must fit in int64
    firsts, seconds = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for keys_N in _band_keys(words_NW, bands):
        i, j = _equal_key_pairs(keys_N)
        distance = _popcount(words_NW[i] ^ words_NW[j])
        keep = (distance <= max_distance) & (owner_N[i] != owner_N[j])
        i, j = i[keep], j[keep]
        swap = owner_N[i] > owner_N[j]
        firsts.append(np.where(swap, j, i))
        seconds.append(np.where(swap, i, j))
    pairs = np.unique(np.stack([np.concatenate(firsts), np.concatenate(seconds)], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _equal_key_pairs(keys_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i, j), i != j, with keys[i] == keys[j], each pair once (vectorized per offset)."""
    order = np.argsort(keys_N, kind="stable")
    sorted_keys = keys_N[order]
    starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    run_end = np.r_[np.flatnonzero(starts)[1:], len(order)][np.cumsum(starts) - 1]
    remaining = run_end - np.arange(len(order)) - 1  # later members of the same run
    firsts, seconds = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    active = np.flatnonzero(remaining >= 1)
    offset = 1
    while active.size:
        firsts.append(order[active])
        seconds.append(order[active + offset])
        offset += 1
        active = active[remaining[active] >= offset]
    return np.concatenate(firsts), np.concatenate(seconds)


class _UnionFind:
    def __init__(self, names: Iterable[str]):
        self.parent = {name: name for name in names}

    def find(self, name: str) -> str:
        root = name
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[name] != root:  # path compression
            self.parent[name], name = root, self.parent[name]
        return root

    def union(self, first: str, second: str) -> None:
        a, b = self.find(first), self.find(second)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def merge_patient_groups(
    volumes: pd.DataFrame,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    min_slices: int = DEFAULT_MIN_SLICES,
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> dict[str, str]:
    """Map each volume_id to its merged patient group.

    ``volumes``: one row per volume with ``volume_id``, ``patient_group`` and ``fingerprints`` (a list of
    per-slice fingerprints; empty ones are ignored), or one row per slice with ``fingerprint`` (index
    rows). Two volumes join when at least ``min_slices`` of
    one's slices, or ``min_fraction`` of the smaller volume's fingerprinted slices, have a fingerprint
    within ``max_distance`` bits in the other (counted on both sides, the smaller count decides).
    Joining is transitive (union-find over groups). A merged group is named by its member groups,
    sorted and joined with ``+``; a group that joins nothing keeps its name.
    """
    volumes = _per_volume(volumes)
    groups = _UnionFind(volumes["patient_group"].astype(str))
    words, owner, slice_counts = _flatten_fingerprints(volumes)
    first, second = _near_pairs(words, owner, max_distance)
    for volume_a, volume_b in _matching_volume_pairs(first, second, owner, slice_counts, min_slices, min_fraction):
        group_a = str(volumes["patient_group"].iloc[volume_a])
        group_b = str(volumes["patient_group"].iloc[volume_b])
        if groups.find(group_a) != groups.find(group_b):
            log.info("merging patient groups %s and %s (shared slices)", group_a, group_b)
            groups.union(group_a, group_b)
    return _merged_names(volumes, groups)


def _per_volume(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per volume (volume_id, patient_group, fingerprints), from per-volume or per-slice rows."""
    if "fingerprints" not in frame.columns and "fingerprint" in frame.columns:
        frame = frame.groupby("volume_id", sort=True).agg(
            patient_group=("patient_group", "first"), fingerprints=("fingerprint", list)).reset_index()
    missing = [name for name in ("volume_id", "patient_group", "fingerprints") if name not in frame.columns]
    if missing:
        raise ConfigError("volumes", f"missing columns {missing}; expected volume_id, patient_group and "
                          "fingerprints (per volume) or fingerprint (per slice)")
    return frame.reset_index(drop=True)


def _flatten_fingerprints(volumes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words (M,) uint64, owner (M,) volume position, fingerprinted slices per volume (V,))."""
    kept: list[bytes] = []
    owners: list[int] = []
    counts = np.zeros(len(volumes), dtype=np.int64)
    for position, fingerprints in enumerate(volumes["fingerprints"]):
        usable = [bytes(f) for f in (fingerprints if fingerprints is not None else []) if f is not None and len(f)]
        bad = [len(f) for f in usable if len(f) != FINGERPRINT_BYTES]
        if bad:
            message = f"row {position}: a fingerprint of {bad[0]} bytes; expected {FINGERPRINT_BYTES}"
            raise ConfigError("volumes.fingerprints", message)
        kept += usable
        owners += [position] * len(usable)
        counts[position] = len(usable)
    return _fingerprint_words(kept), np.asarray(owners, dtype=np.int64), counts


def _matching_volume_pairs(
    first: np.ndarray,
    second: np.ndarray,
    owner: np.ndarray,
    slice_counts: np.ndarray,
    min_slices: int,
    min_fraction: float,
) -> list[tuple[int, int]]:
    """Volume pairs (a < b) whose distinct matched slices, counted on each side, reach the thresholds."""
    pairs = pd.DataFrame({"a": owner[first], "b": owner[second], "i": first, "j": second})
    shared = pairs.groupby(["a", "b"]).agg(slices_a=("i", "nunique"), slices_b=("j", "nunique")).reset_index()
    count = np.minimum(shared["slices_a"], shared["slices_b"]).to_numpy()
    smaller = np.minimum(slice_counts[shared["a"]], slice_counts[shared["b"]])
    joined = (count >= min_slices) | (count >= min_fraction * smaller)
    return list(zip(shared["a"][joined].tolist(), shared["b"][joined].tolist()))


def _merged_names(volumes: pd.DataFrame, groups: _UnionFind) -> dict[str, str]:
    members: dict[str, set[str]] = defaultdict(set)
    for group in volumes["patient_group"].astype(str):
        members[groups.find(group)].add(group)
    names = {root: "+".join(sorted(names)) for root, names in members.items()}
    return {
        str(volume_id): names[groups.find(str(group))]
        for volume_id, group in zip(volumes["volume_id"], volumes["patient_group"])
    }


def split_fraction_point(group: str, seed: int) -> float:
    """A stable point in [0, 1) for ``group``: sha256 of ``"<seed>:<group>"``, first 8 bytes."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(
    groups: Iterable[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    pinned: Mapping[str, str] | None = None,
    members: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, str]:
    """Map each (merged) patient group to ``train`` / ``val`` / ``test``.

    A group's split depends only on (seed, group name, fractions): its hash point in [0, 1) is compared
    with the cumulative fractions, so adding or removing other groups never moves it. ``pinned`` maps a
    group name, or any name in ``members[group]`` (subjects, pre-merge groups; by default the ``+``-joined
    parts of a merged name), to a split; a pin moves its whole group. Two different pins inside one group
    raise :class:`ConfigError` naming them; a pin that names nothing is logged as ignored.
    """
    bounds = _cumulative_bounds(fractions)
    pinned = dict(pinned or {})
    _check_pin_values(pinned)
    groups = sorted(set(groups))
    if members is None:
        members = {group: group.split("+") for group in groups}
    members = {group: set(names) for group, names in members.items()}
    used_pins: set[str] = set()
    splits = {}
    for group in groups:
        pins = {name: pinned[name] for name in sorted({group} | members.get(group, set())) if name in pinned}
        used_pins.update(pins)
        if len(set(pins.values())) > 1:
            raise ConfigError("pinned", f"group {group!r} has conflicting pins {pins}; expected one split per group")
        point = split_fraction_point(group, seed)
        splits[group] = next(iter(pins.values())) if pins else SPLITS[int(np.searchsorted(bounds, point, "right"))]
    ignored = sorted(set(pinned) - used_pins)
    if ignored:
        log.warning("pins for %s match no patient group or member; ignored", ignored)
    return splits


def _cumulative_bounds(fractions: Sequence[float]) -> np.ndarray:
    values = np.asarray(fractions, dtype=np.float64)
    if values.shape != (len(SPLITS),) or np.any(values < 0) or abs(values.sum() - 1.0) > 1e-6:
        raise ConfigError("fractions", f"{list(fractions)}; expected {len(SPLITS)} non-negative numbers summing to 1 "
                          f"for {list(SPLITS)}")
    return np.cumsum(values)[:-1]  # a point >= bounds[k] falls after split k


def _check_pin_values(pinned: Mapping[str, str]) -> None:
    bad = {name: split for name, split in pinned.items() if split not in SPLITS}
    if bad:
        raise ConfigError("pinned", f"{bad}; expected splits among {list(SPLITS)}")


def split_index(
    table: pa.Table,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    pinned: Mapping[str, str] | None = None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    min_slices: int = DEFAULT_MIN_SLICES,
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> pa.Table:
    """Merge patient groups by fingerprint and fill ``patient_group`` and ``split`` of an index table.

    ``pinned`` keys may be subjects, recipe patient groups, or merged group names.
    """
    columns = ["volume_id", "subject", "patient_group", "fingerprint"] + (["domain"] if "domain" in table.column_names else [])
    frame = table.select(columns).to_pandas()
    merged = merge_patient_groups(frame, max_distance, min_slices, min_fraction)
    members: dict[str, set[str]] = defaultdict(set)
    for volume_id, subject, group in zip(frame["volume_id"], frame["subject"], frame["patient_group"]):
        members[merged[volume_id]].update((str(subject), str(group)))
    splits = assign_splits(sorted(members), fractions, seed, pinned, members)
    if "domain" in frame:
        pinned_groups = {group for group in members if any(name in (pinned or {}) for name in {group} | members[group])}
        by_domain: dict[str, set[str]] = defaultdict(set)
        for volume_id, domain in zip(frame["volume_id"], frame["domain"]):
            by_domain[str(domain)].add(merged[volume_id])
        for domain in sorted(by_domain):
            fill_empty_splits(splits, sorted(by_domain[domain]), fractions, seed, pinned_groups)
    new_groups = [merged[volume_id] for volume_id in frame["volume_id"]]
    table = _replace_column(table, "patient_group", new_groups)
    return _replace_column(table, "split", [splits[group] for group in new_groups])


def fill_empty_splits(
    splits: dict[str, str], groups: Sequence[str], fractions: Sequence[float], seed: int, fixed: set[str]
) -> None:
    """Give every split with a positive fraction at least one of ``groups`` (e.g. one domain's), in place.

    Hash splits are stable but, on a handful of groups, can leave val or test empty (4 groups at
    80/10/10 are all train 41% of the time), and then nothing can be evaluated. When a split is empty
    and the largest split has two or more movable (unpinned) groups, the one whose hash point lies
    closest to the empty split's interval moves. Datasets with enough groups are never touched, so
    splits stay stable as data grows; tiny ones get a usable val and test.
    """
    bounds = np.concatenate([[0.0], _cumulative_bounds(fractions), [1.0]])
    for index, split in enumerate(SPLITS):
        members = [group for group in groups if splits[group] == split]
        if fractions[index] <= 0 or members:
            continue
        counts = {name: sum(splits[group] == name for group in groups) for name in SPLITS}
        donor = max(SPLITS, key=lambda name: counts[name])
        movable = [group for group in groups if splits[group] == donor and group not in fixed]
        if counts[donor] < 2 or not movable:
            continue
        low, high = bounds[index], bounds[index + 1]
        distance = {group: max(low - split_fraction_point(group, seed), split_fraction_point(group, seed) - high, 0.0) for group in movable}
        chosen = min(movable, key=lambda group: (distance[group], group))
        log.info("split %s had no patient group of %d; moving %s from %s", split, len(groups), chosen, donor)
        splits[chosen] = split


def _replace_column(table: pa.Table, name: str, values: list[str]) -> pa.Table:
    position = table.schema.get_field_index(name)
    return table.set_column(position, table.schema.field(position), pa.array(values, pa.string()))
