"""The public MONAI integration: medaug slices as MONAI dictionary items (DESIGN §1, issue 12).

Datasets (map-style, random access from the memory-mapped shards; they work with ``monai.data.DataLoader``,
``CacheDataset``, ``DistributedSampler`` and MONAI dictionary transforms):

* :class:`SliceDataset`: the real slices of a prepared dataset (``medaug prepare``);
* :class:`SyntheticDataset`: the samples of a synthetic folder (``medaug synthesize``; its ``manifest.parquet``);
* :class:`MixedDataset`: both at a fixed synthetic fraction, as one deterministic dataset that
  ``DistributedSampler`` shards like any other;
* :class:`GeneratorDataset` (an ``IterableDataset``): samples generated on the fly by a trained generator,
  dealt over DDP ranks and DataLoader workers without duplicates.

**Items.** Every dataset yields dicts with the same keys, so real and synthetic items batch together:

=================  ==========================================================================================
key                value
=================  ==========================================================================================
``image``          ``MetaTensor`` (C, H, W) float32, model space [-1, 1]. ``channels="domain"``: C is the
                   row's domain channels (``ct`` → 1, ``t2, adc`` → 2); ``"max"``: C is the dataset's largest
                   channel count, missing channels are zeros (``channel_mask`` says which are real)
``label``          ``MetaTensor`` (1, H, W) uint8: vocabulary ids (0 background, 255 ignore), or with
                   ``classes=`` consecutive class ids (below)
``channel_mask``   (C,) bool tensor, True for the domain's channels
``domain``         str, e.g. ``mr/prostate``
``structures``     :class:`Names` of the vocabulary structures present in the stored slice (before any
                   transform; a crop may remove some)
``slice_id``       str, the index's stable slice id (``<volume_id>:<slice_index>``)
=================  ==========================================================================================

``image`` and ``label`` carry the same metadata (``MetaTensor.meta``, each its own dict):

* ``affine``: (4, 4) float64, pixel (row, col, 0, 1) → RAS mm, the index's ``affine`` column; ``space`` RAS.
* ``spacing``: (2,) float64 [row, col] mm as stored (``MetaTensor.pixdim`` follows the affine through
  spatial transforms; this key does not); ``slice_thickness_mm``: float.
* ``intensity``: the row's per-channel mapping from model space back to source units, as the index stores
  it (a JSON string, so that it batches; :func:`intensity_mappings` parses it).
* ``filename_or_obj``: the slice id (what MONAI's savers and loggers name an item by).
* ``domain``, ``modality``, ``plane``, ``channels`` (:class:`Names`), ``structures_annotated`` (:class:`Names`).
* ``synthetic``: bool; for synthetic rows also ``seed`` (the sample's sampler seed), ``sample_id``,
  ``condition_present`` and ``condition_annotated`` (:class:`Names`) from the manifest; real rows carry
  ``seed`` -1, ``sample_id`` "" and empty conditions, so that every item has the same keys.

**Why a 4×4 affine on a 2D image.** A ``MetaTensor``'s affine is 4×4 unless a reader says otherwise (MONAI's
NIfTI reader gives a 2D image a 4×4 one, its ITK reader a 3×3 one); MONAI's spatial transforms accept either:
on a (C, H, W) tensor they build a 3×3 homogeneous 2D matrix, embed it (``to_affine_nd``) into the
tensor's affine size and right-multiply. Keeping the full 4×4 of the index therefore keeps what a 3×3 would
drop (the slice's 3D origin, its through-plane direction and thickness), and after ``RandAffined`` the affine
still maps every output pixel to its RAS position (tested), so ``SaveImaged`` writes the slice where it lies
in the patient. Transforms that interpret the affine as a 2D one (``Spacingd``, ``Orientationd``) use its
top-left 2×2 block and translation (``to_affine_nd(2, affine)``), which describes the plane only for axial
slices; medaug slices are already at their domain's spacing and orientation, so those are not needed.

**Labels.** Without ``classes`` the label holds vocabulary ids (``medaug.vocab``). With ``classes`` (vocabulary
names) it holds consecutive ids: ``dataset.class_names[k - 1]`` is class k (names in vocabulary-id order),
0 is background and 255 stays ignore. A vocabulary id maps to its own class, else to the class of its nearest
ancestor in the set (``prostate_peripheral_zone`` → ``prostate``), else to 255 when a descendant is in the set
(the label is coarser than the class), else to 0; a row whose ``structures_annotated`` does not cover every
class has its background set to 255, since "not annotated" is never "absent" (DESIGN §3). This is the
nnU-Net exporter's mapping (:class:`medaug.synth.export.nnunet.NnunetLabels`) with ignore kept at 255. Losses
must skip 255 (``examples/train_unet_monai.py`` shows one way). MONAI's spatial transforms return float32
labels; the values stay ids when they resample labels with ``mode="nearest"``.

**Batching.** Use ``monai.data.DataLoader`` (``list_data_collate``): it batches the ``MetaTensor`` metadata
per key. :class:`Names` values batch as a list of tuples (one per item): importing this module registers
that rule in torch's ``default_collate_fn_map`` for the :class:`Names` type only, as MONAI registers its
``MetaTensor``, so plain ``torch.utils.data.DataLoader`` batches them too.

**Mixing and DistributedSampler.** :class:`MixedDataset` decides once, from (lengths, fraction, ``length``,
``seed``), which of its positions are synthetic; that layout is the same in every process, so
``DistributedSampler`` (which shuffles positions with its own seed, the same on every rank, and hands rank r
every W-th one) gives the ranks disjoint shares that together are exactly the epoch's positions: per epoch,
over all ranks, exactly ``n_synthetic`` synthetic and ``n_real`` real slices, and about the fraction on each
rank. Call ``dataset.set_epoch(e)`` next to ``sampler.set_epoch(e)`` to move on to other synthetic samples
when there are more than one epoch uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from monai.data import MetaTensor
from monai.transforms import apply_transform
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate_fn_map

from medaug import vocab
from medaug.data.dataset import PreparedSliceDataset
from medaug.data.index import intensity_from_json, read_index
from medaug.data.shards import MANIFEST_FILE, image_path, index_file
from medaug.errors import ConfigError
from medaug.synth.export.nnunet import NnunetLabels

log = logging.getLogger(__name__)

ChannelMode = Literal["domain", "max"]
Transform = Callable[[dict[str, Any]], Any]
CHANNEL_MODES: tuple[str, ...] = ("domain", "max")
# Index columns read for item metadata (beyond what PreparedSliceDataset reads), then manifest columns.
_META_COLUMNS = ["affine", "spacing_mm", "slice_thickness_mm", "intensity", "modality", "plane", "channels",
                 "structures_present", "structures_annotated", "synthetic"]
_SYNTHESIS_COLUMNS = ["seed", "sample_id", "condition_present", "condition_annotated"]


class Names(tuple):
    """A tuple of names (structures, channels) that a DataLoader batches as a list of tuples, one per item.

    Without it, torch's collate would zip lists of different lengths (and fail on them).
    """

    __slots__ = ()


def _collate_names(batch: Sequence[Names], *, collate_fn_map: Any = None) -> list[Names]:
    return list(batch)


default_collate_fn_map.setdefault(Names, _collate_names)


def intensity_mappings(meta_intensity: str) -> list[dict[str, Any]]:
    """The per-channel intensity mappings (model [-1, 1] → source units) of an item's ``meta["intensity"]``."""
    return intensity_from_json(meta_intensity)


class _RowMeta:
    """Per-row metadata of a :class:`PreparedSliceDataset`'s rows, in its order, ready to build items."""

    def __init__(self, base: PreparedSliceDataset):
        table = _aligned_columns(base, _META_COLUMNS + _SYNTHESIS_COLUMNS)
        rows = base.rows.num_rows
        self.affine_N44 = _fixed_list(table, "affine", 16).reshape(rows, 4, 4)
        self.spacing_N2 = _fixed_list(table, "spacing_mm", 2)
        self.thickness_N = table.column("slice_thickness_mm").to_numpy().astype(np.float64)
        self.intensity = table.column("intensity").to_pylist()
        self.modality = table.column("modality").to_pylist()
        self.plane = table.column("plane").to_pylist()
        self.channels = _names_column(table, "channels")
        self.present = _names_column(table, "structures_present")
        self.annotated = _names_column(table, "structures_annotated")
        self.synthetic_N = table.column("synthetic").to_numpy(zero_copy_only=False).astype(bool)
        self.seed_N = _int_column(table, "seed", rows, default=-1)
        self.sample_id = _str_column(table, "sample_id", rows)
        self.condition_present = _names_column(table, "condition_present")
        self.condition_annotated = _names_column(table, "condition_annotated")

    def meta(self, position: int, domain: str, slice_id: str) -> dict[str, Any]:
        """A fresh ``MetaTensor.meta`` dict for row ``position`` (module docstring), without the affine."""
        return {
            "filename_or_obj": slice_id,
            "spacing": torch.from_numpy(self.spacing_N2[position].copy()),
            "slice_thickness_mm": float(self.thickness_N[position]),
            "intensity": self.intensity[position],
            "domain": domain,
            "modality": self.modality[position],
            "plane": self.plane[position],
            "channels": self.channels[position],
            "structures_annotated": self.annotated[position],
            "synthetic": bool(self.synthetic_N[position]),
            "seed": int(self.seed_N[position]),
            "sample_id": self.sample_id[position],
            "condition_present": self.condition_present[position],
            "condition_annotated": self.condition_annotated[position],
        }


def _aligned_columns(base: PreparedSliceDataset, columns: Sequence[str]) -> pa.Table:
    """The index file's ``columns`` (those it has) for ``base``'s rows, in ``base`` order (joined on slice_id)."""
    path = index_file(base.root)
    available = set(pq.read_schema(path).names)
    table = read_index(path, columns=["slice_id", *[name for name in columns if name in available]])
    positions = pc.index_in(base.rows.column("slice_id"), value_set=table.column("slice_id").combine_chunks())
    if positions.null_count:
        raise ConfigError(path, "rows of the dataset are missing from the index; expected an unchanged index")
    return table.take(positions)


def _fixed_list(table: pa.Table, column: str, size: int) -> np.ndarray:
    """(N, size) float64 from a list column of ``size`` numbers per row."""
    values = pc.list_flatten(table.column(column).combine_chunks()).to_numpy(zero_copy_only=False)
    return np.array(values, dtype=np.float64).reshape(-1, size)  # a writable copy


def _names_column(table: pa.Table, column: str) -> list[Names]:
    """Each row's list of names as :class:`Names` (equal lists share one object); empty when absent or null."""
    if column not in table.column_names:
        return [Names()] * table.num_rows
    interned: dict[tuple[str, ...], Names] = {}
    names = []
    for value in table.column(column).to_pylist():
        key = tuple(value or ())
        names.append(interned.setdefault(key, Names(key)))
    return names


def _int_column(table: pa.Table, column: str, rows: int, default: int) -> np.ndarray:
    if column not in table.column_names:
        return np.full(rows, default, dtype=np.int64)
    return table.column(column).fill_null(default).to_numpy().astype(np.int64)


def _str_column(table: pa.Table, column: str, rows: int) -> list[str]:
    if column not in table.column_names:
        return [""] * rows
    return [value or "" for value in table.column(column).to_pylist()]


def _resolve_structures(structures: str | Sequence[str] | None) -> list[str] | None:
    """Vocabulary names and everything below them (``prostate`` → prostate and its zones)."""
    if structures is None:
        return None
    names = [structures] if isinstance(structures, str) else list(structures)
    return sorted({name for given in names for name in vocab.resolve(given)})


def class_labels(classes: Sequence[str]) -> NnunetLabels:
    """The consecutive-label mapping of ``classes`` (vocabulary names; module docstring "Labels")."""
    names = [classes] if isinstance(classes, str) else list(classes)
    if not names:
        raise ConfigError("classes", "is empty; expected vocabulary names, e.g. ['prostate'], or None for ids")
    for name in names:
        vocab.structure(name)  # an unknown name raises with a suggestion
    return NnunetLabels.from_names(names)


def _consecutive_lut(labels: NnunetLabels) -> torch.Tensor:
    """(256,) uint8: vocabulary id → class id, with the nnU-Net ignore label moved back to 255."""
    lut = labels.lut.copy()
    lut[lut == labels.ignore_label] = vocab.IGNORE
    return torch.from_numpy(lut)


def _covered_rows(annotated: list[Names], labels: NnunetLabels) -> np.ndarray:
    """(N,) bool: the row's annotated set says where every class is (distinct sets checked once)."""
    verdicts: dict[Names, bool] = {}
    return np.array([verdicts.setdefault(names, labels.covered_by(names)) for names in annotated], dtype=bool)


class SliceDataset(Dataset):
    """Slices of a prepared dataset as MONAI dictionary items (module docstring for keys and metadata).

    Args:
        prepared_dir: a prepared dataset folder (``index.parquet`` + shards; a synthetic folder works too).
        split: keep rows of this split (``train``/``val``/``test``) or these splits; None keeps all.
        domains: keep rows of these domains (``"mr/prostate"`` or a list); None keeps all.
        structures: keep rows where at least one of these vocabulary structures, or a structure below one
            of them in the hierarchy, is present; None keeps all.
        channels: ``"domain"``: each item has its domain's channels (items of domains with different
            channel counts cannot share a batch); ``"max"``: every item has the dataset's largest channel
            count, zero-filled.
        classes: None: labels are vocabulary ids; vocabulary names: labels are consecutive class ids
            (module docstring "Labels"; :attr:`class_names`).
        transform: applied to each item (e.g. a ``monai.transforms.Compose`` of dictionary transforms).
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        split: str | Sequence[str] | None = None,
        domains: str | Sequence[str] | None = None,
        structures: str | Sequence[str] | None = None,
        channels: ChannelMode = "domain",
        classes: Sequence[str] | None = None,
        transform: Transform | None = None,
    ):
        self._open(Path(prepared_dir), split, domains, structures, channels, classes, transform, None)

    def _open(self, root: Path, split: str | Sequence[str] | None, domains: str | Sequence[str] | None,
              structures: str | Sequence[str] | None, channels: ChannelMode, classes: Sequence[str] | None,
              transform: Transform | None, channels_out: int | None) -> None:
        if channels not in CHANNEL_MODES:
            raise ConfigError("channels", f"is {channels!r}; expected one of {list(CHANNEL_MODES)}")
        self.channels = channels
        self.transform = transform
        self.base = PreparedSliceDataset(root, split, domains, _resolve_structures(structures), channels_out)
        self.rows = _RowMeta(self.base)
        self._channel_counts = pc.list_value_length(self.base.rows.column("channels")).to_numpy().astype(np.int64)
        self.labels = None if classes is None else class_labels(classes)
        self._lut = None if self.labels is None else _consecutive_lut(self.labels)
        self._covered_N = None if self.labels is None else _covered_rows(self.rows.annotated, self.labels)
        if len(self) and self.num_channels is None:
            log.warning("%s: rows have %s channels with channels='domain'; items of different domains cannot share "
                        "a batch (use channels='max' or one domain)", root, sorted(set(self._channel_counts.tolist())))

    @property
    def root(self) -> Path:
        return self.base.root

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class k's vocabulary name at position k - 1 (with ``classes``); empty without."""
        return () if self.labels is None else self.labels.structures

    @property
    def num_channels(self) -> int | None:
        """C of every ``image``; None when ``channels="domain"`` and the rows' domains differ in channel count."""
        if self.channels == "max":
            return self.base.channels_out
        counts = np.unique(self._channel_counts)
        return int(counts[0]) if counts.size == 1 else None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([int(index)])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Items at ``indices`` (read from the shards in one pass, then transformed one by one)."""
        batch = self.base.read_batch(indices)
        items = [self._item(batch, position) for position in range(len(indices))]
        if self.transform is None:
            return items
        return [apply_transform(self.transform, item) for item in items]

    def _item(self, batch: dict[str, Any], position: int) -> dict[str, Any]:
        """Item ``position`` of a :meth:`PreparedSliceDataset.read_batch` batch (module docstring)."""
        row = int(batch["index"][position])
        domain, slice_id = batch["domain"][position], batch["slice_id"][position]
        count = int(self._channel_counts[row]) if self.channels == "domain" else self.base.channels_out
        image_CHW = batch["image"][position, :count]
        label_1HW = self._label(batch["label"][position], row)[None]
        affine_44 = self.rows.affine_N44[row]
        return {
            "image": MetaTensor(image_CHW, affine=torch.tensor(affine_44), meta=self.rows.meta(row, domain, slice_id)),
            "label": MetaTensor(label_1HW, affine=torch.tensor(affine_44), meta=self.rows.meta(row, domain, slice_id)),
            "channel_mask": batch["channel_mask"][position, :count],
            "domain": domain,
            "structures": self.rows.present[row],
            "slice_id": slice_id,
        }

    def _label(self, label_HW: torch.Tensor, row: int) -> torch.Tensor:
        """(H, W) uint8: vocabulary ids, or class ids (255 where unknown or not annotated) with ``classes``."""
        if self._lut is None:
            return label_HW
        classes_HW = self._lut[label_HW.long()]
        if not self._covered_N[row]:
            classes_HW[label_HW == vocab.BACKGROUND] = vocab.IGNORE
        return classes_HW


class SyntheticDataset(SliceDataset):
    """The samples of a synthetic folder (``manifest.parquet`` + shards, ``medaug.synth.layout``) as MONAI items.

    The same items as :class:`SliceDataset` (module docstring), with ``synthetic=True``, the sample's ``seed``,
    ``sample_id`` and condition in the metadata. Synthetic rows have no split. The shards hold the generator's
    channel count (zeros past a domain's channels); ``channels="domain"`` keeps the domain's channels only.
    Arguments as :class:`SliceDataset`.
    """

    def __init__(
        self,
        synthetic_dir: str | Path,
        domains: str | Sequence[str] | None = None,
        structures: str | Sequence[str] | None = None,
        channels: ChannelMode = "domain",
        classes: Sequence[str] | None = None,
        transform: Transform | None = None,
    ):
        root = Path(synthetic_dir)
        if index_file(root) != root / MANIFEST_FILE:
            raise ConfigError(root, f"has no {MANIFEST_FILE} (or also an index.parquet); expected a folder that "
                              "medaug synthesize wrote (use SliceDataset for a prepared dataset)")
        self._open(root, None, domains, structures, channels, classes, transform, _stored_channels(root))
        if not self.rows.synthetic_N.all():
            raise ConfigError(root / MANIFEST_FILE, "has rows with synthetic=False; expected only synthetic samples")


def _stored_channels(root: Path) -> int | None:
    """The channel count of the folder's shards (the generator's C_max), read from one shard's header."""
    shards = read_index(root / MANIFEST_FILE, columns=["shard"]).column("shard")
    if len(shards) == 0:
        return None
    images = np.load(image_path(root, shards[0].as_py()), mmap_mode="r", allow_pickle=False)
    return int(images.shape[1])


class MixedDataset(Dataset):
    """Real and synthetic items at a fixed fraction, as one deterministic map-style dataset.

    Args:
        real, synthetic: map-style datasets of items with the same keys (:class:`SliceDataset`,
            :class:`SyntheticDataset`, or a ``CacheDataset`` over one of them).
        synthetic_fraction: the share of synthetic positions, in [0, 1].
        length: positions per epoch; None: every real item once per epoch plus
            ``round(len(real) * f / (1 - f))`` synthetic ones (``len(synthetic)`` when f is 1).
        seed: fixes which positions are synthetic and the order in which items fill them.

    Position p is synthetic when ``is_synthetic_L[p]``: exactly ``n_synthetic = round(length * f)`` positions,
    placed by a seeded permutation (not alternating, which a strided ``DistributedSampler`` without shuffling
    would split into an all-real and an all-synthetic rank). The k-th synthetic position reads synthetic item
    ``order[(k + epoch * n_synthetic) % len(synthetic)]`` for a seeded permutation ``order`` (real items
    likewise), so :meth:`set_epoch` walks through all synthetic items over the epochs. The layout depends only
    on the arguments, so every process builds the same one and ``DistributedSampler`` shards it (module
    docstring). ``set_epoch`` changes what a copy of the dataset in a DataLoader worker reads only when the
    workers start after it (not with ``persistent_workers=True``).
    """

    def __init__(self, real: Dataset, synthetic: Dataset, synthetic_fraction: float, length: int | None = None,
                 seed: int = 0):
        self.real, self.synthetic = real, synthetic
        self.n_real, self.n_synthetic = _slot_counts(len(real), len(synthetic), synthetic_fraction, length)
        generator = np.random.default_rng(seed)
        total = self.n_real + self.n_synthetic
        self.is_synthetic_L = np.zeros(total, dtype=bool)
        self.is_synthetic_L[generator.permutation(total)[: self.n_synthetic]] = True
        counts_L = np.where(self.is_synthetic_L, np.cumsum(self.is_synthetic_L), np.cumsum(~self.is_synthetic_L))
        self._slot_L = counts_L - 1  # k: this is the k-th position of its kind
        self._real_order = generator.permutation(len(real))
        self._synthetic_order = generator.permutation(len(synthetic))
        self.epoch = 0
        _check_channels_match(real, synthetic)

    def set_epoch(self, epoch: int) -> None:
        """Read the items of ``epoch`` from now on (same positions, other synthetic items)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.is_synthetic_L)

    def source(self, index: int) -> tuple[bool, int]:
        """(synthetic?, index into that dataset) of position ``index`` in the current epoch."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} mixed items")
        slot = int(self._slot_L[index])
        if self.is_synthetic_L[index]:
            position = (slot + self.epoch * self.n_synthetic) % len(self.synthetic)
            return True, int(self._synthetic_order[position])
        position = (slot + self.epoch * self.n_real) % len(self.real)
        return False, int(self._real_order[position])

    def __getitem__(self, index: int) -> Any:
        synthetic, child_index = self.source(int(index))
        return (self.synthetic if synthetic else self.real)[child_index]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Items at ``indices``, each child dataset read in one call (its ``__getitems__`` when it has one)."""
        sources = [self.source(int(index)) for index in indices]
        items: list[Any] = [None] * len(indices)
        for flag, dataset in ((False, self.real), (True, self.synthetic)):
            positions = [p for p, (synthetic, _) in enumerate(sources) if synthetic == flag]
            children = [sources[p][1] for p in positions]
            for position, item in zip(positions, _read_many(dataset, children)):
                items[position] = item
        return items


def _read_many(dataset: Dataset, indices: list[int]) -> list[Any]:
    if not indices:
        return []
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(indices)
    return [dataset[index] for index in indices]


def _slot_counts(real: int, synthetic: int, fraction: float, length: int | None) -> tuple[int, int]:
    """(n_real, n_synthetic) positions per epoch (:class:`MixedDataset`)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError("synthetic_fraction", f"is {fraction}; expected a value in [0, 1]")
    if length is not None and length < 1:
        raise ConfigError("length", f"is {length}; expected a positive number of items per epoch or None")
    if length is not None:
        n_synthetic = int(round(length * fraction))
        n_real = length - n_synthetic
    elif fraction == 1.0:
        n_real, n_synthetic = 0, synthetic
    else:
        n_real, n_synthetic = real, int(round(real * fraction / (1.0 - fraction)))
    if n_synthetic and not synthetic:
        raise ConfigError("synthetic", f"is empty; expected samples for {n_synthetic} synthetic positions")
    if n_real and not real:
        raise ConfigError("real", f"is empty; expected slices for {n_real} real positions")
    if n_real + n_synthetic == 0:
        raise ConfigError("length", "gives no positions; expected a non-empty real or synthetic dataset")
    return n_real, n_synthetic


def _check_channels_match(real: Dataset, synthetic: Dataset) -> None:
    """Refuse datasets whose images cannot share a batch (both channel counts known and different)."""
    real_channels = getattr(real, "num_channels", None)
    synthetic_channels = getattr(synthetic, "num_channels", None)
    if real_channels is not None and synthetic_channels is not None and real_channels != synthetic_channels:
        raise ConfigError("synthetic", f"images have {synthetic_channels} channels, the real ones {real_channels}; "
                          "expected equal counts (channels='domain' with domains of one channel count)")


def annotating_domains(root: str | Path, classes: Sequence[str]) -> list[str]:
    """Sorted domains of a prepared (or synthetic) folder with rows whose annotated set covers every class.

    "Covers" as the label conversion decides (module docstring "Labels"): a class is annotated itself,
    through an ancestor, or through all of its children.
    """
    labels = class_labels(classes)
    table = read_index(index_file(root), columns=["domain", "structures_annotated"])
    pairs = {(domain, tuple(names)) for domain, names in zip(table.column("domain").to_pylist(),
                                                             table.column("structures_annotated").to_pylist())}
    return sorted({domain for domain, names in pairs if labels.covered_by(names)})


__all__ = [
    "GeneratorDataset",
    "check_generation_process",
    "CHANNEL_MODES",
    "ChannelMode",
    "MixedDataset",
    "Names",
    "SliceDataset",
    "SyntheticDataset",
    "annotating_domains",
    "class_labels",
    "intensity_mappings",
]


# ---------------------------------------------------------------- generation on the fly


def _worker_shard(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(shard id, shard count) of the calling process: DDP rank × DataLoader worker.

    ``rank``/``world_size`` default to the initialized process group's (0 / 1 without one).
    """
    import torch.distributed as dist
    from torch.utils.data import get_worker_info

    if rank is None or world_size is None:
        joined = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if joined else (0, 1)
    worker = get_worker_info()
    workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
    return rank * workers + worker_id, world_size * workers


def check_generation_process(device: str | torch.device, in_bad_fork: bool) -> None:
    """Refuse CUDA generation in a process forked after CUDA started (it cannot work there).

    GeneratorDataset generates in the process that iterates it: the main process (``num_workers=0``, the
    recommended setting on a GPU, where one process already keeps the GPU busy) or spawned DataLoader
    workers (``multiprocessing_context="spawn"``); forked workers are fine on the CPU.
    """
    if torch.device(device).type == "cuda" and in_bad_fork:
        raise ConfigError("GeneratorDataset", "generates on cuda inside a forked DataLoader worker; expected "
                          "num_workers=0 or DataLoader(..., multiprocessing_context='spawn')")


class GeneratorDataset(torch.utils.data.IterableDataset):
    """Labelled slices generated on the fly by a trained generator, as MONAI dictionary items.

    The plan (:func:`medaug.synth.plan.make_plan`: ``n`` samples, class-balanced over ``structures``) is the
    same in every process; its batches are dealt round-robin over (DDP rank × DataLoader worker), so ranks
    and workers see disjoint samples that together are the plan, each exactly once per pass. Items have the
    keys and metadata of :class:`SyntheticDataset` (``filename_or_obj`` is the sample id, as its files
    would be named). The generator loads lazily in the iterating process (see
    :func:`check_generation_process` for where generation may run).

    Args:
        checkpoint: a generator run folder (``medaug train var|all``) or one of its checkpoints.
        structures: targets (``--organ`` names; parents resolve to their parts); None: spread over domains.
        n: samples per pass. domains, balance, seed, batch_size: as ``medaug synthesize``.
        sampling: guidance/top-k/top-p/temperature (:class:`medaug.synth.plan.SamplingSettings`).
        device, dtype: where and how to generate (``cpu``, ``cuda``...; ``float32``/``bfloat16``).
        channels, classes, transform: as :class:`SliceDataset`.
        rank, world_size: override the process group's (None: read it when iterating).
        redraws: as ``medaug synthesize --redraws``: a sample whose mask misses its target is drawn again.
    """

    def __init__(self, checkpoint: str | Path, structures: str | Sequence[str] | None = None, n: int = 1024,
                 domains: str | Sequence[str] | None = None, balance: str = "structure", seed: int = 0,
                 batch_size: int = 16, sampling: Any = None, device: str | torch.device = "cpu",
                 dtype: str | None = None, channels: ChannelMode = "domain", classes: Sequence[str] | None = None,
                 transform: Transform | None = None, rank: int | None = None, world_size: int | None = None,
                 redraws: int = 2):
        from medaug.synth.plan import PlanRequest, SamplingSettings

        if channels not in CHANNEL_MODES:
            raise ConfigError("channels", f"is {channels!r}; expected one of {list(CHANNEL_MODES)}")
        targets = (structures,) if isinstance(structures, str) else tuple(structures or ())
        domain_list = (domains,) if isinstance(domains, str) else tuple(domains or ())
        self.request = PlanRequest(n=n, targets=targets, domains=domain_list, balance=balance, seed=seed,
                                   batch_size=batch_size, sampling=sampling or SamplingSettings(), redraws=redraws)
        self.checkpoint, self.device, self.dtype = Path(checkpoint), torch.device(device), dtype
        self.channels, self.transform, self.rank, self.world_size = channels, transform, rank, world_size
        self.labels = None if classes is None else class_labels(classes)
        self._lut = None if self.labels is None else _consecutive_lut(self.labels)
        self._generator: Any = None

    def __len__(self) -> int:
        """Samples in the whole plan (all ranks and workers together)."""
        return self.request.n

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_generator"] = None  # each process loads its own (never pickle a model into a worker)
        return state

    def generator(self) -> Any:
        """The loaded :class:`~medaug.synth.engine.SynthGenerator` of this process."""
        from medaug.synth.engine import SynthGenerator

        check_generation_process(self.device, torch.cuda._is_in_bad_fork())
        if self._generator is None:
            self._generator = SynthGenerator(self.checkpoint, self.device, self.dtype)
        return self._generator

    def __iter__(self):
        from medaug.synth.plan import make_plan
        from medaug.synth.run import redraw_missing

        shard, shards = _worker_shard(self.rank, self.world_size)
        generator = self.generator()
        plan = make_plan(self.request, generator.bank, generator.domain_names)
        for batch_index in range(shard, plan.num_batches, shards):
            planned = plan.batch(batch_index)
            batch = generator.generate(planned, self.request.sampling)
            samples, _ = redraw_missing(generator, planned, batch, self.request.sampling, self.request.redraws)
            for position, sample in enumerate(samples):
                item = self._item(generator, plan, sample, batch, position)
                yield item if self.transform is None else apply_transform(self.transform, item)

    def _item(self, generator: Any, plan: Any, sample: Any, batch: Any, position: int) -> dict[str, Any]:
        from medaug.synth import layout
        from medaug.data.index import intensity_to_json
        from medaug.synth.engine import domain_plane, export_affine, export_intensity

        domain = generator.domains[sample.domain]
        count = len(domain["channels"]) if self.channels == "domain" else batch.image_BCHW.shape[1]
        image_CHW = torch.from_numpy(batch.image_BCHW[position, :count].copy())
        image_CHW[len(domain["channels"]):] = 0.0
        label_HW = torch.from_numpy(batch.label_BHW[position].copy())
        annotated = Names(plan.names(sample.annotated)) if not sample.unconditional else Names(generator.table.names)
        if self._lut is not None:
            covered = self.labels.covered_by(annotated)
            classes_HW = self._lut[label_HW.long()]
            if not covered:
                classes_HW[label_HW == vocab.BACKGROUND] = vocab.IGNORE
            label_HW = classes_HW
        affine = torch.tensor(export_affine(domain, generator.size))
        spacing = float(domain["spacing_mm"])
        sample_id = layout.sample_id(sample.index)

        def meta() -> dict[str, Any]:
            return {"filename_or_obj": sample_id, "spacing": torch.tensor([spacing, spacing], dtype=torch.float64),
                    "slice_thickness_mm": spacing, "intensity": intensity_to_json(export_intensity(domain)),
                    "domain": sample.domain, "modality": domain["modality"].upper(), "plane": domain_plane(domain),
                    "channels": Names(domain["channels"]), "structures_annotated": annotated, "synthetic": True,
                    "seed": int(sample.seed), "sample_id": sample_id,
                    "condition_present": Names(plan.names(sample.present)),
                    "condition_annotated": Names(plan.names(sample.annotated))}

        return {"image": MetaTensor(image_CHW, affine=affine, meta=meta()),
                "label": MetaTensor(label_HW[None], affine=affine.clone(), meta=meta()),
                "channel_mask": torch.arange(count) < len(domain["channels"]),
                "domain": sample.domain, "structures": Names(batch.present[position]), "slice_id": sample_id}
