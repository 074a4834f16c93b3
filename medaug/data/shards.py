"""Pixel shards of a prepared dataset: one memory-mappable shard per volume, written atomically.

Layout under the dataset root::

    shards/<volume_id>.image.npy   (N, C, H, W) float16, model space [-1, 1]
    shards/<volume_id>.label.npy   (N, H, W) uint8, 0 background, 255 ignore (absent for image-only sources)
    parts/<volume_id>.parquet      the volume's index rows (``index.py`` schema), written LAST
    index.parquet                  all parts: :func:`assemble_index` sorts by (volume_id, slice_index); a
                                   prepared dataset's ``finalize`` re-sorts by content (``prepare.pipeline``)

Why one shard per volume. ``prepare`` handles one volume at a time and must resume after a kill: each
file is written under a ``.part-<pid>-`` name and renamed, and the parts file is renamed last, so a
volume counts as complete (:meth:`ShardWriter.is_complete`) only once everything it needs is in place;
a killed run leaves at most ``.part-*`` files, which :meth:`ShardWriter.cleanup_stale` removes. Plain
``.npy`` files open with ``np.load(mmap_mode="r")`` (numpy, or any .npy reader), and a slice is one
contiguous run of ``C*H*W`` float16 plus one of ``H*W`` bytes, so a random read costs the same whatever
the shard size. Measured on the 2-core CPU sandbox (2,000 slices of 256², 2 channels, read in random
order by ``batched_loader``, 2 workers, 6 alternating runs each, a busy shared machine): 20 per-volume
shards vs the same slices in one 2,000-slice shard gave medians of 4,150 vs 4,350 slices/s cold and
16,600 vs 14,100 warm, equal within the run-to-run noise (±40 %), so multi-volume shards, which would
make atomic per-volume writes and resume harder, are not used. Asking the kernel to read a whole
batch ahead (``madvise(MADV_WILLNEED)`` per slice before copying) made cold reads slower here (median
2,700 vs 5,000 slices/s over 10 alternating runs), so reads rely on the page-fault read-around.
Benchmark: ``benchmarks/read_index.py``; results: ``benchmarks/results/read_index-cpu2.json``.

Reading. :class:`ShardStore` opens memmaps lazily in the process that reads (a DataLoader worker opens its
own; pickling a store drops its open maps) and keeps at most ``max_open`` shards open (LRU), since each
memmap holds a file descriptor.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from medaug.data.index import IndexSchemaError, make_slice_id, read_index, rows_to_table, write_index
from medaug.errors import MedaugError
from medaug.io.atomic import PART_PREFIX, atomic_output

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
PARTS_DIR = "parts"
INDEX_FILE = "index.parquet"
MANIFEST_FILE = "manifest.parquet"  # a synthetic folder's index (``medaug.synth.layout``)
IMAGE_SUFFIX = ".image.npy"
LABEL_SUFFIX = ".label.npy"
IGNORE_LABEL = 255
IMAGE_DTYPE = np.float16
# Model space is [-1, 1]; float16 rounding and resampling may step just outside.
_IMAGE_LIMIT = 1.0 + 1e-3


class ShardError(MedaugError):
    """A shard is missing, malformed, or does not match the arrays or rows given for it."""


def shard_stem(volume_id: str) -> str:
    """The ``shard`` column value of a volume: its stem relative to the dataset root."""
    return f"{SHARDS_DIR}/{volume_id}"


def image_path(root: str | Path, shard: str) -> Path:
    return Path(root) / f"{shard}{IMAGE_SUFFIX}"


def label_path(root: str | Path, shard: str) -> Path:
    return Path(root) / f"{shard}{LABEL_SUFFIX}"


def part_path(root: str | Path, volume_id: str) -> Path:
    return Path(root) / PARTS_DIR / f"{volume_id}.parquet"


class ShardWriter:
    """Writes one volume at a time into a prepared-dataset root; safe to kill and rerun.

    ``fsync`` flushes each file to disk before its rename, so a power loss (not only a kill) cannot leave
    a complete-looking volume with missing bytes.
    """

    def __init__(self, root: str | Path, fsync: bool = True):
        self.root = Path(root)
        self.fsync = fsync
        (self.root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / PARTS_DIR).mkdir(parents=True, exist_ok=True)

    def is_complete(self, volume_id: str) -> bool:
        """True once the volume's parts file and image shard exist (the parts file is written last)."""
        return part_path(self.root, volume_id).is_file() and image_path(self.root, shard_stem(volume_id)).is_file()

    def completed_volumes(self) -> set[str]:
        """Volume ids whose parts file exists (temporary ``.part-*`` files are not counted)."""
        return set(completed_volume_ids(self.root))

    def write_volume(
        self,
        volume_id: str,
        images_NCHW: np.ndarray,
        labels_NHW: np.ndarray | None,
        rows: Sequence[Mapping[str, Any]],
        extra_types: Mapping[str, pa.DataType] | None = None,
    ) -> None:
        """Write a volume's slices and rows as one unit; rewriting the same volume replaces it.

        ``images_NCHW``: model space [-1, 1], any float dtype, stored as float16. ``labels_NHW``: uint8
        (0 background, 255 ignore, else vocabulary ids) or None for image-only sources. ``rows``: one
        index row per slice, in array order; ``shard`` and ``shard_row`` are filled here, ``slice_id``,
        ``height`` and ``width`` are filled when absent and checked when present. ``extra_types``: types of
        extra (non-index) columns, as :func:`~medaug.data.index.rows_to_table` takes them.
        """
        where = f"volume {volume_id}"
        images_NCHW = _checked_images(images_NCHW, where)
        labels_NHW = _checked_labels(labels_NHW, images_NCHW.shape, where)
        table = rows_to_table(_complete_rows(rows, volume_id, images_NCHW.shape, where), extra_types)
        part = part_path(self.root, volume_id)
        part.unlink(missing_ok=True)  # the volume stops counting as complete before any byte changes
        shard = shard_stem(volume_id)
        self._save_npy(image_path(self.root, shard), images_NCHW)
        if labels_NHW is None:
            label_path(self.root, shard).unlink(missing_ok=True)
        else:
            self._save_npy(label_path(self.root, shard), labels_NHW)
        write_index(table, part, fsync=self.fsync)
        log.debug("wrote %s: %d slices", volume_id, images_NCHW.shape[0])

    def _save_npy(self, path: Path, array: np.ndarray) -> None:
        with atomic_output(path) as temporary:
            with open(temporary, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())

    def cleanup_stale(self) -> list[Path]:
        """Remove ``.part-*`` files left by killed writers; returns what was removed.

        A temporary file whose writer process is still alive on this host is kept, so this is safe to
        call while other workers of the same run write other volumes.
        """
        removed = []
        for folder in (self.root, self.root / SHARDS_DIR, self.root / PARTS_DIR):
            for path in sorted(folder.glob(f"{PART_PREFIX}*")):
                if _writer_alive(path):
                    continue
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            log.info("removed %d stale temporary files under %s", len(removed), self.root)
        return removed


def _checked_images(images_NCHW: np.ndarray, where: str) -> np.ndarray:
    images_NCHW = np.asarray(images_NCHW)
    if images_NCHW.ndim != 4 or images_NCHW.shape[0] == 0:
        raise ShardError(where, f"images have shape {images_NCHW.shape}; expected (N>0, C, H, W)")
    if not np.issubdtype(images_NCHW.dtype, np.floating):
        raise ShardError(where, f"images have dtype {images_NCHW.dtype}; expected float in model space [-1, 1]")
    # the range is checked on float32 or wider: numpy reduces float16 without SIMD (0.37 s for a batch of 256
    # two-channel 256² images, most of what `medaug synthesize` spent writing shards)
    wide_NCHW = images_NCHW if images_NCHW.dtype.itemsize >= 4 else images_NCHW.astype(np.float32)
    low, high = float(wide_NCHW.min()), float(wide_NCHW.max())
    if not (np.isfinite(low) and np.isfinite(high) and -_IMAGE_LIMIT <= low and high <= _IMAGE_LIMIT):
        raise ShardError(where, f"image values span [{low}, {high}] (or are not finite); expected model space [-1, 1]")
    return np.ascontiguousarray(images_NCHW, dtype=IMAGE_DTYPE)


def _checked_labels(labels_NHW: np.ndarray | None, image_shape: tuple[int, ...], where: str) -> np.ndarray | None:
    if labels_NHW is None:
        return None
    labels_NHW = np.asarray(labels_NHW)
    expected = (image_shape[0], *image_shape[2:])
    if labels_NHW.shape != expected or labels_NHW.dtype != np.uint8:
        raise ShardError(where, f"labels are {labels_NHW.dtype} {labels_NHW.shape}; expected uint8 {expected}")
    return np.ascontiguousarray(labels_NHW)


def _complete_rows(
    rows: Sequence[Mapping[str, Any]], volume_id: str, image_shape: tuple[int, ...], where: str
) -> list[dict[str, Any]]:
    """Rows with ``shard``, ``shard_row`` (and missing ``slice_id``/``height``/``width``) filled and checked."""
    if len(rows) != image_shape[0]:
        raise ShardError(where, f"{len(rows)} rows for {image_shape[0]} slices; expected one row per slice")
    height, width = image_shape[2:]
    completed = []
    for shard_row, row in enumerate(rows):
        if row.get("slice_index") is None:
            raise ShardError(where, f"row {shard_row} has no slice_index; expected the index along the slicing axis")
        slice_id = make_slice_id(volume_id, row["slice_index"])
        row = {"height": height, "width": width, "slice_id": slice_id, **row}
        row.update(shard=shard_stem(volume_id), shard_row=shard_row)
        expected = {"volume_id": volume_id, "height": height, "width": width, "slice_id": slice_id}
        for name, value in expected.items():
            if row.get(name) != value:
                raise ShardError(where, f"row {shard_row}: {name}={row.get(name)!r}; expected {value!r}")
        completed.append(row)
    return completed


def _writer_alive(path: Path) -> bool:
    """Whether the process id in ``.part-<pid>-name`` is a running process other than this one's past self."""
    pid_text = path.name[len(PART_PREFIX):].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # this process is not writing it now (cleanup runs between writes)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def completed_volume_ids(root: str | Path) -> list[str]:
    """Sorted ids of the volumes whose parts file exists under ``root/parts``."""
    folder = Path(root) / PARTS_DIR
    names = [p.name for p in folder.glob("*.parquet") if not p.name.startswith(PART_PREFIX)]
    return sorted(name[: -len(".parquet")] for name in names)


def assemble_index(root: str | Path) -> pa.Table:
    """All completed volumes' rows in one table, sorted by (volume_id, slice_index).

    The order depends only on the content, so a resumed run and an uninterrupted one give identical
    tables. Parts with extra columns are merged (missing extras become null). Raises
    :class:`IndexSchemaError` for an unreadable part.
    """
    root = Path(root)
    tables = [read_index(part_path(root, volume_id)) for volume_id in completed_volume_ids(root)]
    if not tables:
        raise IndexSchemaError(root / PARTS_DIR, "no completed volumes; expected at least one parts file")
    table = pa.concat_tables(tables, promote_options="default")
    table = table.sort_by([("volume_id", "ascending"), ("slice_index", "ascending")])
    return table.combine_chunks().replace_schema_metadata(tables[0].schema.metadata)


def index_file(root: str | Path) -> Path:
    """The index of a slice folder: ``index.parquet`` of a prepared dataset, else ``manifest.parquet`` of a
    synthetic one (same schema plus synthesis columns); the former when neither exists (errors name it)."""
    root = Path(root)
    if not (root / INDEX_FILE).is_file() and (root / MANIFEST_FILE).is_file():
        return root / MANIFEST_FILE
    return root / INDEX_FILE


def write_assembled_index(root: str | Path, table: pa.Table | None = None) -> Path:
    """Write ``table`` (default: :func:`assemble_index`) to ``root/index.parquet`` atomically."""
    table = assemble_index(root) if table is None else table
    return write_index(table, Path(root) / INDEX_FILE)


class ShardStore:
    """Random-access reads of slices from a prepared dataset's shards (memory-mapped, opened lazily).

    Safe to hand to DataLoader workers: each process opens its own maps; pickling drops them.
    """

    def __init__(self, root: str | Path, max_open: int = 128):
        self.root = Path(root)
        self.max_open = max_open
        self._maps: OrderedDict[str, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        return state

    def open(self, shard: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The shard's image memmap (N, C, H, W) float16 and label memmap (N, H, W) uint8 or None."""
        if self._pid != os.getpid():  # forked: the parent's maps are not ours to manage
            self._maps = OrderedDict()
            self._pid = os.getpid()
        maps = self._maps.get(shard)
        if maps is None:
            maps = self._open_maps(shard)
            self._maps[shard] = maps
            if len(self._maps) > self.max_open:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(shard)
        return maps

    def _open_maps(self, shard: str) -> tuple[np.ndarray, np.ndarray | None]:
        path = image_path(self.root, shard)
        labels_path = label_path(self.root, shard)
        try:
            images = np.load(path, mmap_mode="r", allow_pickle=False)
            labels = np.load(labels_path, mmap_mode="r", allow_pickle=False) if labels_path.is_file() else None
        except (OSError, ValueError) as error:  # ValueError also for a truncated file
            raise ShardError(path, f"cannot open shard ({error}); expected (N, C, H, W) and (N, H, W) .npy") from None
        label_shape = None if labels is None else labels.shape
        if images.ndim != 4 or (labels is not None and label_shape != (images.shape[0], *images.shape[2:])):
            raise ShardError(path, f"image shape {images.shape} and label shape {label_shape} do not match; "
                             "expected (N, C, H, W) and (N, H, W)")
        return images, labels

    def read(self, shard: str, row: int) -> tuple[np.ndarray, np.ndarray | None]:
        """One slice: image (C, H, W) float16 and label (H, W) uint8 (None for image-only shards), copies."""
        images, labels = self.open(shard)
        image_CHW = np.array(images[row])
        label_HW = None if labels is None else np.array(labels[row])
        return image_CHW, label_HW

    def read_many(
        self,
        shards: Sequence[str],
        rows: Sequence[int],
        out_images_BCHW: np.ndarray,
        out_labels_BHW: np.ndarray,
    ) -> np.ndarray:
        """Fill ``out_*[b]`` with slice ``rows[b]`` of ``shards[b]``; returns labelled_B (bool).

        Copies in (shard, row) order, for locality. Channels beyond a shard's C are set to 0, a shard's
        channels beyond the output's are left out (a synthetic batch stores the generator's C_max); labels of
        image-only shards are set to 255 (ignore). ``out_images_BCHW`` may be float16 or float32.
        """
        labelled_B = np.ones(len(rows), dtype=bool)
        for position in sorted(range(len(rows)), key=lambda b: (shards[b], rows[b])):
            images, labels = self.open(shards[position])
            channels = min(images.shape[1], out_images_BCHW.shape[1])
            out_images_BCHW[position, :channels] = images[rows[position], :channels]
            out_images_BCHW[position, channels:] = 0
            if labels is None:
                out_labels_BHW[position] = IGNORE_LABEL
                labelled_B[position] = False
            else:
                out_labels_BHW[position] = labels[rows[position]]
        return labelled_B

    def close(self) -> None:
        """Drop every open memmap (they close when no array refers to them)."""
        self._maps.clear()
