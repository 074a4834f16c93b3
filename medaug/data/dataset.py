"""``PreparedSliceDataset``: a map-style torch Dataset over a prepared dataset (index + shards).

Items are dicts:

* ``image``: (C_max, H, W) ``dtype`` tensor in model space [-1, 1]; a domain with fewer channels than
  ``C_max`` (the most over the whole prepared dataset) has zeros in the rest,
* ``channel_mask``: (C_max,) bool, True for the domain's channels,
* ``label``: (H, W) uint8 (0 background, 255 ignore, else vocabulary ids); all 255 for image-only rows,
* ``domain``: str, ``slice_id``: str, ``index``: int (the item's position in this dataset).

``dataset[i]`` gives one item; ``dataset[[i, j, ...]]`` gives a whole batch (tensors with a leading B,
lists of strings) read in one pass. :func:`batched_loader` is the fast path: a DataLoader with
automatic batching off (PyTorch's "load batched samples directly" pattern) whose workers read whole
batches into recycled shared memory. A plain ``DataLoader(dataset, batch_size=..., num_workers=...)``
works too (``__getitems__`` reads each batch in one pass, the default collate stacks it), at a fresh
shared-memory buffer per batch.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, get_worker_info

from medaug.data.index import read_index
from medaug.data.shards import ShardStore, index_file
from medaug.errors import ConfigError

log = logging.getLogger(__name__)

_READ_COLUMNS = ["slice_id", "split", "domain", "channels", "height", "width", "shard", "shard_row",
                 "structures_present"]


class PreparedSliceDataset(Dataset):
    """Slices of a prepared dataset, filtered by split, domain and structures present.

    ``root``: the prepared dataset folder (``index.parquet`` + shards), or a synthetic folder
    (``manifest.parquet`` + shards, ``medaug.synth.layout``). ``split``/``domains``: keep rows
    whose value is one of these (a single string is allowed). ``structures``: keep rows where at least
    one of these vocabulary names is present. ``channels_out``: C_max, default the most channels of any
    row in the index (so every split of one dataset has the same C_max). ``dtype``: image dtype
    (float16 halves the bytes moved; convert on the GPU).
    """

    def __init__(
        self,
        root: str | Path,
        split: str | Sequence[str] | None = None,
        domains: str | Sequence[str] | None = None,
        structures: str | Sequence[str] | None = None,
        channels_out: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.root = Path(root)
        self.dtype = dtype
        index_path = index_file(self.root)
        index = read_index(index_path, columns=_READ_COLUMNS)
        self.channels_out = _channels_out(index, channels_out, index_path)
        self.rows = _filter_rows(index, _as_list(split), _as_list(domains), _as_list(structures))
        self.height, self.width = _slice_size(self.rows, index_path)
        self.store = ShardStore(self.root)
        self._shards = self.rows.column("shard").to_numpy(zero_copy_only=False)
        self._shard_rows = self.rows.column("shard_row").to_numpy().astype(np.int64)
        self._domains = self.rows.column("domain").to_numpy(zero_copy_only=False)
        self._slice_ids = self.rows.column("slice_id").to_numpy(zero_copy_only=False)
        self._channels = pc.list_value_length(self.rows.column("channels")).to_numpy().astype(np.int64)
        self._staging_buffer: np.ndarray | None = None
        self._slots: _BatchSlots | None = None
        if len(self) == 0:
            log.warning("%s: no rows match split=%s domains=%s structures=%s", self.root, split, domains, structures)

    def __len__(self) -> int:
        return self.rows.num_rows

    def __getitem__(self, item: int | Sequence[int]) -> dict[str, Any]:
        """One item for an int, a batch dict (leading B) for a sequence of ints."""
        if isinstance(item, (int, np.integer)):
            return _unbatch(self.read_batch([int(item)]), 0)
        return self.read_batch(item)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A DataLoader batch as a list of items (views of one batch read), for the default collate."""
        batch = self.read_batch(indices)
        return [_unbatch(batch, position) for position in range(len(indices))]

    def read_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """The items at ``indices`` as one batch dict: image (B, C_max, H, W), label (B, H, W) ..."""
        positions = self._positions(indices)
        layout = _BatchLayout((len(positions), self.channels_out, self.height, self.width), self.dtype)
        image_BCHW, label_BHW = layout.tensors(torch.UntypedStorage(layout.nbytes))
        self._fill(positions, image_BCHW, label_BHW)
        return {"image": image_BCHW, "label": label_BHW, **self._row_fields(positions)}

    def read_shared_batch(self, indices: Sequence[int]) -> _SharedBatch:
        """:meth:`read_batch` into a recycled shared-memory buffer, for a DataLoader worker to send
        (see :class:`_BatchSlots`); it unpickles as the batch dict in the receiving process."""
        positions = self._positions(indices)
        layout = _BatchLayout((len(positions), self.channels_out, self.height, self.width), self.dtype)
        if self._slots is None or self._slots.pid != os.getpid():
            self._slots = _BatchSlots()
        slot, storage = self._slots.acquire(layout.nbytes)
        try:
            self._fill(positions, *layout.tensors(storage))
        except BaseException:
            self._slots.release(slot)
            raise
        fields = self._row_fields(positions)
        fields["channel_mask"] = fields["channel_mask"].numpy()  # small: pickled inline
        fields["index"] = fields["index"].numpy()
        return _SharedBatch(storage, self._slots.flags, slot, layout, fields)

    def _positions(self, indices: Sequence[int]) -> np.ndarray:
        positions = np.asarray(indices, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} slices: {list(indices)}")
        return positions % max(len(self), 1)

    def _fill(self, positions: np.ndarray, image_BCHW: torch.Tensor, label_BHW: torch.Tensor) -> None:
        # numpy converts float16 one element at a time; torch's vectorized copy_ is ~5x faster.
        staging_BCHW = image_BCHW.numpy() if self.dtype == torch.float16 else self._staging(image_BCHW.shape)
        self.store.read_many(self._shards[positions], self._shard_rows[positions], staging_BCHW, label_BHW.numpy())
        if self.dtype != torch.float16:
            image_BCHW.copy_(torch.from_numpy(staging_BCHW))

    def _row_fields(self, positions: np.ndarray) -> dict[str, Any]:
        channels_B = torch.from_numpy(self._channels[positions])
        return {
            "channel_mask": torch.arange(self.channels_out)[None, :] < channels_B[:, None],  # (B, C_max)
            "domain": self._domains[positions].tolist(),
            "slice_id": self._slice_ids[positions].tolist(),
            "index": torch.from_numpy(positions),
        }

    def _staging(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float16 buffer of ``shape``, reused across batches of one process."""
        if self._staging_buffer is None or self._staging_buffer.shape != tuple(shape):
            self._staging_buffer = np.empty(shape, dtype=np.float16)
        return self._staging_buffer

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_staging_buffer"] = None
        state["_slots"] = None
        return state


def _unbatch(batch: dict[str, Any], position: int) -> dict[str, Any]:
    return {
        "image": batch["image"][position],
        "channel_mask": batch["channel_mask"][position],
        "label": batch["label"][position],
        "domain": batch["domain"][position],
        "slice_id": batch["slice_id"][position],
        "index": int(batch["index"][position]),
    }


@dataclass(frozen=True)
class _BatchLayout:
    """Image (B, C, H, W) ``dtype`` then label (B, H, W) uint8 in one byte buffer."""

    image_shape: tuple[int, int, int, int]
    dtype: torch.dtype

    @property
    def image_nbytes(self) -> int:
        return math.prod(self.image_shape) * self.dtype.itemsize

    @property
    def label_offset(self) -> int:
        return -(-self.image_nbytes // 64) * 64  # cache-line aligned

    @property
    def nbytes(self) -> int:
        batch, _, height, width = self.image_shape
        return max(self.label_offset + batch * height * width, 1)

    def tensors(self, storage: torch.UntypedStorage) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = self.image_shape
        image_BCHW = torch.empty(0, dtype=self.dtype).set_(storage, 0, self.image_shape)
        label_BHW = torch.empty(0, dtype=torch.uint8).set_(storage, self.label_offset, (batch, height, width))
        return image_BCHW, label_BHW


class _BatchSlots:
    """A DataLoader worker's pool of shared-memory batch buffers, reused once the main process drops them.

    Why: a fresh shared-memory buffer per batch costs a page fault per 4 KiB page in the worker (about
    0.85 GB/s of fresh memory on the 2-core sandbox VM against 7 GB/s for reused memory); with a fresh
    buffer per batch a 2-worker loader delivered 3,000-3,800 float16 slices/s warm, with reused buffers
    13,000-15,000 (``benchmarks/read_index.py``, 256², 2 channels, batch 64). ``flags[slot]`` is
    1 from when the worker fills a slot until the receiving process has dropped every tensor of that
    batch (a ``weakref.finalize`` on its storage, which lives exactly as long as its tensors). A batch
    kept by the receiver keeps its slot; when all slots are taken a fresh, unpooled buffer is used.
    """

    def __init__(self, max_slots: int = 8):
        self.pid = os.getpid()
        self.flags = torch.empty(0, dtype=torch.int32).set_(
            torch.UntypedStorage._new_shared(4 * max_slots), 0, (max_slots,)).zero_()
        self._flags_np = self.flags.numpy()
        self._storages: list[torch.UntypedStorage | None] = [None] * max_slots

    def acquire(self, nbytes: int) -> tuple[int, torch.UntypedStorage]:
        """(slot, storage of >= nbytes); slot -1 means unpooled (every slot is in use)."""
        free = [slot for slot in range(len(self._storages)) if self._flags_np[slot] == 0]
        for slot in free:
            storage = self._storages[slot]
            if storage is not None and storage.nbytes() >= nbytes:
                self._flags_np[slot] = 1
                return slot, storage
        if free:
            slot = next((s for s in free if self._storages[s] is None), free[0])
            self._storages[slot] = torch.UntypedStorage._new_shared(nbytes)
            self._flags_np[slot] = 1
            return slot, self._storages[slot]
        return -1, torch.UntypedStorage._new_shared(nbytes)

    def release(self, slot: int) -> None:
        if slot >= 0:
            self._flags_np[slot] = 0


class _SharedBatch:
    """What a worker sends: pickles as the shared storage plus layout, unpickles as the batch dict."""

    def __init__(self, storage: torch.UntypedStorage, flags: torch.Tensor, slot: int, layout: _BatchLayout,
                 fields: dict[str, Any]):
        self.storage, self.flags, self.slot, self.layout, self.fields = storage, flags, slot, layout, fields

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _receive_shared_batch, (self.storage, self.flags, self.slot, self.layout, self.fields)


def _receive_shared_batch(storage: torch.UntypedStorage, flags: torch.Tensor, slot: int, layout: _BatchLayout,
                          fields: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a worker's batch on its shared storage; free the slot when the batch is garbage."""
    image_BCHW, label_BHW = layout.tensors(storage)
    if slot >= 0:
        weakref.finalize(storage, _release_slot, flags, slot)
    fields = {**fields, "channel_mask": torch.from_numpy(fields["channel_mask"]),
              "index": torch.from_numpy(fields["index"])}
    return {"image": image_BCHW, "label": label_BHW, **fields}


def _release_slot(flags: torch.Tensor, slot: int) -> None:
    flags[slot] = 0


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _channels_out(index: pa.Table, channels_out: int | None, where: Path) -> int:
    counts = pc.list_value_length(index.column("channels"))
    most = int(pc.max(counts).as_py() or 0)
    if channels_out is None:
        return max(most, 1)
    if channels_out < most:
        raise ConfigError("channels_out", f"{channels_out} is fewer than the {most} channels some rows of {where} have")
    return channels_out


def _filter_rows(
    index: pa.Table, splits: list[str] | None, domains: list[str] | None, structures: list[str] | None
) -> pa.Table:
    keep = pa.array(np.ones(index.num_rows, dtype=bool))
    if splits is not None:
        keep = pc.and_(keep, pc.fill_null(pc.is_in(index.column("split"), pa.array(splits)), False))
        _warn_unknown("split", splits, index.column("split"))
    if domains is not None:
        keep = pc.and_(keep, pc.is_in(index.column("domain"), pa.array(domains)))
        _warn_unknown("domain", domains, index.column("domain"))
    if structures is not None:
        keep = pc.and_(keep, pa.array(_has_any(index.column("structures_present"), structures)))
    return index.filter(keep)


def _has_any(lists: pa.ChunkedArray, names: list[str]) -> np.ndarray:
    """(rows,) bool: the row's list holds at least one of ``names``."""
    lists = lists.combine_chunks()
    hits = pc.is_in(pc.list_flatten(lists), pa.array(names)).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(lists).to_numpy()
    found = np.zeros(len(lists), dtype=bool)
    found[parents[hits]] = True
    return found


def _warn_unknown(column: str, wanted: list[str], values: pa.ChunkedArray) -> None:
    unknown = sorted(set(wanted) - set(pc.unique(values.drop_null()).to_pylist()))
    if unknown:
        log.warning("no rows with %s in %s", column, unknown)


def _slice_size(rows: pa.Table, where: Path) -> tuple[int, int]:
    sizes = pc.unique(pc.binary_join_element_wise(pc.cast(rows.column("height"), pa.string()),
                                                  pc.cast(rows.column("width"), pa.string()), "x")).to_pylist()
    if len(sizes) > 1:
        raise ConfigError(str(where), f"slices of several sizes {sorted(sizes)}; expected one H x W")
    if not sizes:
        return 0, 0
    height, width = sizes[0].split("x")
    return int(height), int(width)


class _BatchReader(Dataset):
    """``reader[indices]``: one batch of ``dataset``, sent from workers through recycled shared memory."""

    def __init__(self, dataset: PreparedSliceDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Sequence[int]) -> dict[str, Any] | _SharedBatch:
        if get_worker_info() is None:
            return self.dataset.read_batch(indices)
        return self.dataset.read_shared_batch(indices)


def batched_loader(
    dataset: PreparedSliceDataset,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    num_workers: int = 2,
    drop_last: bool = False,
    **loader_options: Any,
) -> DataLoader:
    """A DataLoader whose workers read whole batches (one ``dataset[list]`` call per batch).

    Order: a random permutation drawn from ``generator`` when ``shuffle``, else index order. Batches are
    dicts as :meth:`PreparedSliceDataset.read_batch` returns them; workers hand them over in recycled
    shared memory (:class:`_BatchSlots`). ``loader_options`` go to DataLoader (``pin_memory``,
    ``persistent_workers``, ``worker_init_fn``...); ``collate_fn`` is not one of them (the batch is
    already collated).
    """
    if "collate_fn" in loader_options:
        raise ConfigError("collate_fn", "batched_loader yields collated batches; expected no collate_fn")
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(order, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(_BatchReader(dataset), sampler=batches, batch_size=None, num_workers=num_workers,
                      **loader_options)
