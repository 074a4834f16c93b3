"""A model's structure table and the dataset view that trains it (DESIGN.md §3 "Labels", "Paired masks").

A model knows S structures: the union of ``structures_annotated`` over the train split of a prepared
dataset, ordered by vocabulary id. Structure ``names[s - 1]`` has *model-local index* s (1..S); 0 is
background and 255 (``vocab.IGNORE``) stays ignore. Label maps on disk hold vocabulary ids;
:meth:`StructureTable.vocab_to_local_lut` converts them (``lut[label]``), and a vocabulary id the model does
not know becomes ignore (255), so a val/test row labelling such a structure is never scored as if the
structure were background.

:class:`StructureSliceDataset` wraps a :class:`~medaug.data.dataset.PreparedSliceDataset` and yields what the
tokenizer trains on: ``image`` (C_max, H, W) float32 in [-1, 1], ``channel_mask`` (C_max,) bool, ``label``
(H, W) int64 model-local, ``annotated`` (S,) bool (the row's ``structures_annotated`` that the table holds),
``domain_index`` int64 (position in the dataset's sorted domain names) and ``index`` int64 (the item's
position, to look up row metadata such as ``spacing_mm``).

Resolution: when the model's ``image_size`` is smaller than the stored slices (an integer factor f, e.g.
a 64² model on 256² prepared data), the view downsamples on the fly: images by f×f area averaging, labels
by the nearest (centre) pixel of each f×f block. The spacing of a downsampled pixel is f times the row's
``spacing_mm`` (:attr:`StructureSliceDataset.pixel_scale`). Tests and quick runs prepare at 64² directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medaug import vocab
from medaug.data.dataset import PreparedSliceDataset
from medaug.data.index import read_index
from medaug.data.shards import index_file
from medaug.errors import ConfigError, LabelError

DOMAINS_FILE = "domains.json"
INDEX_FILE = "index.parquet"


@dataclass(frozen=True)
class StructureTable:
    """The structures a model knows, in model-local order (index s = ``names[s - 1]``, sorted by vocabulary id)."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        ids = [vocab.structure(name).id for name in self.names]
        if ids != sorted(set(ids)):
            raise LabelError("structure table", f"names {list(self.names)} are not unique and in vocabulary-id order")
        if len(ids) >= vocab.IGNORE:
            raise LabelError("structure table", f"has {len(ids)} structures; expected at most {vocab.IGNORE - 1}")

    @classmethod
    def from_names(cls, names: Sequence[str]) -> StructureTable:
        """A table of the distinct ``names`` (vocabulary names), ordered by vocabulary id."""
        return cls(tuple(sorted(set(names), key=lambda name: vocab.structure(name).id)))

    @property
    def num_structures(self) -> int:
        """S, the number of structures (the model's logits are S + 1 with background)."""
        return len(self.names)

    @property
    def vocab_ids(self) -> tuple[int, ...]:
        """Vocabulary id of model-local index s at position s - 1."""
        return tuple(vocab.structure(name).id for name in self.names)

    def vocab_to_local_lut(self) -> np.ndarray:
        """(256,) uint8: vocabulary id → model-local index; 0 → 0, 255 → 255, ids not in the table → 255."""
        lut = np.full(256, vocab.IGNORE, dtype=np.uint8)
        lut[vocab.BACKGROUND] = 0
        for local, vocab_id in enumerate(self.vocab_ids, start=1):
            lut[vocab_id] = local
        return lut

    def local_to_vocab_lut(self) -> np.ndarray:
        """(256,) uint8: model-local index → vocabulary id; 0 → 0, 255 → 255, unused indices → 255."""
        lut = np.full(256, vocab.IGNORE, dtype=np.uint8)
        lut[0] = vocab.BACKGROUND
        lut[1:self.num_structures + 1] = self.vocab_ids
        return lut

    def annotated_mask(self, names: Sequence[str]) -> np.ndarray:
        """(S,) bool: which table structures are among ``names`` (names outside the table are skipped)."""
        wanted = set(names)
        return np.array([name in wanted for name in self.names], dtype=bool)

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready rows ``{"index", "name", "vocab_id"}`` in model-local order (for checkpoint metadata)."""
        return [{"index": local, "name": name, "vocab_id": vocab.structure(name).id}
                for local, name in enumerate(self.names, start=1)]

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> StructureTable:
        """The table stored by :meth:`to_records`; indices must run 1..S and ids must match the vocabulary."""
        ordered = sorted(records, key=lambda record: record["index"])
        if [record["index"] for record in ordered] != list(range(1, len(ordered) + 1)):
            raise LabelError("structure table", "indices are not 1..S; expected consecutive model-local indices")
        for record in ordered:
            if vocab.structure(record["name"]).id != record["vocab_id"]:
                raise LabelError("structure table", f"{record['name']!r} has vocab_id {record['vocab_id']}; "
                                 f"the vocabulary says {vocab.structure(record['name']).id}")
        return cls(tuple(record["name"] for record in ordered))


def read_structure_table(prepared: str | Path, split: str = "train") -> StructureTable:
    """The union of ``structures_annotated`` over the ``split`` rows of a prepared dataset."""
    index = read_index(Path(prepared) / INDEX_FILE, columns=["split", "structures_annotated"])
    rows = index.filter(pc.fill_null(pc.equal(index.column("split"), split), False))
    names = pc.unique(pc.list_flatten(rows.column("structures_annotated"))).to_pylist()
    return StructureTable.from_names(names)


def read_domain_names(prepared: str | Path) -> list[str]:
    """The domain names of a prepared dataset (``domains.json``), sorted: position = ``domain_index``."""
    path = Path(prepared) / DOMAINS_FILE
    if not path.is_file():
        raise ConfigError(path, "missing; expected the domains.json that medaug prepare writes")
    return sorted(json.loads(path.read_text()))


def read_row_column(dataset: PreparedSliceDataset, column: str) -> list[Any]:
    """Values of index ``column`` for the dataset's rows, in dataset order (joined on ``slice_id``)."""
    index = read_index(index_file(dataset.root), columns=["slice_id", column])
    positions = pc.index_in(dataset.rows.column("slice_id"), value_set=index.column("slice_id").combine_chunks())
    if positions.null_count:
        raise ConfigError(index_file(dataset.root), "rows of the dataset are missing from the index; re-open the dataset")
    return index.column(column).take(positions).to_pylist()


class StructureSliceDataset(Dataset):
    """A prepared split as the tokenizer sees it (module docstring): model-local labels, annotated masks.

    ``base``: the slices (any split/domain filter). ``table``: the model's structures. ``domains``: the
    dataset's domain names (``domain_index`` is a position in it). ``image_size``: the model's side in
    pixels; None keeps the stored size, a divisor of it downsamples.
    """

    def __init__(self, base: PreparedSliceDataset, table: StructureTable, domains: Sequence[str],
                 image_size: int | None = None):
        self.base = base
        self.table = table
        self.domains = list(domains)
        self.pixel_scale = _pixel_scale(base.height, image_size, base.root)
        self.image_size = base.height // self.pixel_scale if base.height else (image_size or 0)
        self._lut = torch.from_numpy(table.vocab_to_local_lut().astype(np.int64))
        annotated = read_row_column(base, "structures_annotated")
        self._annotated_NS = torch.from_numpy(names_matrix(annotated, table))
        self._domain_index_N = torch.from_numpy(_domain_positions(base.rows.column("domain"), self.domains, base.root))

    def __len__(self) -> int:
        return len(self.base)

    def domain_positions(self) -> np.ndarray:
        """(N,) int64: each row's ``domain_index``."""
        return self._domain_index_N.numpy()

    def present_matrix(self) -> np.ndarray:
        """(N, S) bool: the annotated table structures in each row's ``structures_present`` (the index's
        full-resolution truth, one pixel or more)."""
        present = names_matrix(read_row_column(self.base, "structures_present"), self.table)
        return present & self._annotated_NS.numpy()

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        batch = self.read_batch([int(item)])
        return {key: value[0] for key, value in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """A DataLoader batch read in one pass, as a list of items for the default collate."""
        batch = self.read_batch(indices)
        return [{key: value[position] for key, value in batch.items()} for position in range(len(indices))]

    def read_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Items at ``indices`` stacked: image (B, C_max, h, h), label (B, h, h) int64, annotated (B, S)..."""
        raw = self.base.read_batch(indices)
        positions_B = raw["index"].long()
        image_BCHW, label_BHW = _downsample(raw["image"].float(), raw["label"], self.pixel_scale)
        return {
            "image": image_BCHW,
            "channel_mask": raw["channel_mask"],
            "label": self._lut[label_BHW.long()],
            "annotated": self._annotated_NS[positions_B],
            "domain_index": self._domain_index_N[positions_B],
            "index": positions_B,
        }


def _pixel_scale(stored: int, image_size: int | None, where: Path) -> int:
    if image_size is None or stored == 0 or image_size == stored:
        return 1
    if image_size > stored or stored % image_size:
        raise ConfigError("model.image_size", f"is {image_size}; the slices of {where} are {stored}², so expected "
                          f"{stored} or an integer fraction of it (e.g. {stored // 2}); or prepare at size {image_size}")
    return stored // image_size


def _downsample(image_BCHW: torch.Tensor, label_BHW: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-average images and take the centre pixel of each ``factor``² block of labels."""
    if factor == 1:
        return image_BCHW, label_BHW
    centre = factor // 2
    return F.avg_pool2d(image_BCHW, factor), label_BHW[:, centre::factor, centre::factor].contiguous()


def names_matrix(rows: Sequence[Sequence[str] | None], table: StructureTable) -> np.ndarray:
    """(N, S) bool: row n lists table structure s (e.g. ``structures_annotated``; distinct lists converted once)."""
    cache: dict[tuple[str, ...], np.ndarray] = {}
    matrix = np.zeros((len(rows), table.num_structures), dtype=bool)
    for n, names in enumerate(rows):
        key = tuple(names or ())
        if key not in cache:
            cache[key] = table.annotated_mask(key)
        matrix[n] = cache[key]
    return matrix


def _domain_positions(column: pa.ChunkedArray, domains: list[str], where: Path) -> np.ndarray:
    positions = pc.index_in(column, value_set=pa.array(domains, pa.string()))
    if positions.null_count:
        unknown = sorted(set(pc.filter(column, pc.is_null(positions)).to_pylist()))
        raise ConfigError(where / DOMAINS_FILE, f"has no entry for domains {unknown} of the index; expected {domains}")
    return positions.to_numpy(zero_copy_only=False).astype(np.int64)


__all__ = [
    "StructureSliceDataset",
    "StructureTable",
    "names_matrix",
    "read_domain_names",
    "read_row_column",
    "read_structure_table",
]
