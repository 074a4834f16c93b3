"""Pre-tokenization: the train split encoded once by the tokenizer, so that VAR training never runs the
VQ encoder (issue 5 part 4, DESIGN.md §4).

A cache lives beside the run, ``RUN/token_cache/<key>/``:

* ``tokens.npy``: (N, L) int16 (int32 when the codebook has more than 32,767 codes), row i the
  concatenated per-scale token maps (``MultiScaleQuantizer.indices_to_tokens``) of cached row i;
  memory-mapped when read;
* ``rows.parquet``: per cached row ``position`` (row of the train split as
  :class:`~medaug.data.structures.StructureSliceDataset` orders it), ``slice_id``, ``domain_index``
  (position in the sorted domain names), ``flipped``, and the condition multi-hots as lists of model-local
  structure indices: ``present`` (annotated structures covering at least ``present_min_pixels`` pixels
  of the label map the tokenizer saw; the recipe's ``conditioning.min_pixels``) and ``annotated``;
* ``cache.json``: what the key was made of, counts, L, dtype, structure and domain names.

``key`` = the first 16 hex digits of the sha256 of {tokenizer sha256 (:func:`tokenizer_sha256`), sha256
of the prepared ``index.parquet``, image size, flip, present threshold, format version}: a new tokenizer or
new data gives a new folder (rebuilt), the same ones reuse it. A cache is written under a temporary name and renamed
when complete. Under torchrun every rank encodes a contiguous chunk of the rows and rank 0 merges them;
the result does not depend on the number of processes (rows are ordered by (flipped, position)). The
run folder must then be on a file system that every node sees.

Left-right flip (``flip: true``; off by default, DESIGN.md §4): every train row whose in-plane lateral
axis is clear (the pixel axis whose direction in the row's affine is mostly RAS x; sagittal rows have
none) gets a second, mirrored cached row: image and label flipped along that axis before tokenizing,
label ids swapped through ``medaug.vocab.lateral_swap_lut()`` (model-local → vocabulary → swapped →
model-local), and the present/annotated multi-hots swapped accordingly. Rows annotating a lateral
structure whose mirror the model does not know are not flipped (the swapped label would have no index).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from medaug import vocab
from medaug.data.dataset import PreparedSliceDataset
from medaug.data.structures import INDEX_FILE, StructureSliceDataset, StructureTable, read_row_column
from medaug.errors import ConfigError
from medaug.io.atomic import PART_PREFIX
from medaug.models.vqvae import IGNORE_LABEL, VQVAE
from medaug.train import distributed as dist_utils
from medaug.train.checkpoint import sha256_file

log = logging.getLogger(__name__)

CACHE_DIR = "token_cache"
CACHE_FORMAT = "medaug-token-cache"
CACHE_VERSION = 1
TOKENS_FILE = "tokens.npy"
ROWS_FILE = "rows.parquet"
INFO_FILE = "cache.json"
LATERAL_MIN_COSINE = 0.7
"""A pixel axis is the lateral one when its direction's |x| component (unit vector) is at least this (~45°)."""


@dataclass(frozen=True)
class TokenCacheConfig:
    """Pre-tokenization settings: ``flip`` adds left-right mirrored rows (module doc); ``batch_size``
    slices per encoder forward; ``present_min_pixels``: a structure is present in a row's condition when
    it covers at least this many pixels (MedVAR training sets it from ``conditioning.min_pixels``)."""

    flip: bool = False
    batch_size: int = 64
    present_min_pixels: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("tokens.batch_size", f"is {self.batch_size}; expected an integer >= 1")
        if self.present_min_pixels < 1:
            raise ConfigError("tokens.present_min_pixels", f"is {self.present_min_pixels}; expected an integer >= 1")


def tokenizer_sha256(checkpoint_dir: str | Path) -> str:
    """Content hash of a tokenizer checkpoint: sha256 of its weights' sha256 and its model config (JSON).

    Independent of the folder's name, its step, its creation time and of evaluation keys added later.
    """
    meta = json.loads((Path(checkpoint_dir) / "meta.json").read_text())
    content = {"model.safetensors": meta["files"]["model.safetensors"], "model_config": meta["model_config"]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def cache_key(tokenizer_sha: str, index_sha: str, image_size: int, flip: bool, present_min_pixels: int = 1) -> str:
    """16 hex digits naming the cache of this tokenizer, data, size, flip setting and present threshold."""
    content = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "tokenizer_sha256": tokenizer_sha,
               "index_sha256": index_sha, "image_size": image_size, "flip": flip, "split": "train"}
    if present_min_pixels != 1:  # keys of caches built before the threshold existed stay valid
        content["present_min_pixels"] = present_min_pixels
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the cache on disk


@dataclass
class TokenCache:
    """An opened cache (module doc). ``tokens_NL`` is a read-only memory map; ``built`` says whether this
    process's :func:`prepare_token_cache` call wrote it (False: reused)."""

    path: Path
    info: dict[str, Any]
    tokens_NL: np.ndarray | None
    domain_N: np.ndarray
    present_NS: np.ndarray
    annotated_NS: np.ndarray
    flipped_N: np.ndarray
    position_N: np.ndarray
    slice_ids: list[str]
    built: bool = False
    structures: tuple[str, ...] = field(default=())

    @classmethod
    def open(cls, path: str | Path, built: bool = False) -> TokenCache:
        """Read ``cache.json`` and ``rows.parquet`` and memory-map ``tokens.npy``."""
        path = Path(path)
        info_path = path / INFO_FILE
        if not info_path.is_file():
            raise ConfigError(path, f"has no {INFO_FILE}; expected a complete token cache folder")
        info = json.loads(info_path.read_text())
        if info.get("format") != CACHE_FORMAT or info.get("version") != CACHE_VERSION:
            raise ConfigError(info_path, f"is not a {CACHE_FORMAT} version {CACHE_VERSION} file")
        rows = pq.read_table(path / ROWS_FILE)
        structures = len(info["structures"])
        return cls(path, info, np.load(path / TOKENS_FILE, mmap_mode="r"),
                   rows.column("domain_index").to_numpy().astype(np.int64),
                   _lists_to_multi_hot(rows.column("present"), structures),
                   _lists_to_multi_hot(rows.column("annotated"), structures),
                   rows.column("flipped").to_numpy(zero_copy_only=False).astype(bool),
                   rows.column("position").to_numpy().astype(np.int64),
                   rows.column("slice_id").to_pylist(), built, tuple(info["structures"]))

    def __len__(self) -> int:
        return len(self.domain_N)

    @property
    def total_tokens(self) -> int:
        return int(self.info["tokens_per_row"])

    def tokens(self) -> np.ndarray:
        """The (N, L) token memory map (re-opened after unpickling in a DataLoader worker)."""
        if self.tokens_NL is None:
            self.tokens_NL = np.load(self.path / TOKENS_FILE, mmap_mode="r")
        return self.tokens_NL

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["tokens_NL"] = None  # workers map the file themselves instead of receiving a copy
        return state


class TokenDataset(Dataset):
    """Cached rows as training items: ``tokens`` (L,) int64, ``domain`` int64, ``present`` / ``annotated``
    (S,) bool, ``row`` int64 (the cached row)."""

    def __init__(self, cache: TokenCache):
        self.cache = cache
        self._domain_N = torch.from_numpy(cache.domain_N)
        self._present_NS = torch.from_numpy(cache.present_NS)
        self._annotated_NS = torch.from_numpy(cache.annotated_NS)

    def __len__(self) -> int:
        return len(self.cache)

    def read_batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows stacked: tokens (B, L) int64, domain (B,), present / annotated (B, S), row (B,)."""
        rows_B = np.asarray(rows, dtype=np.int64)
        tokens_BL = torch.from_numpy(np.asarray(self.cache.tokens()[rows_B], dtype=np.int64))
        index_B = torch.from_numpy(rows_B)
        return {"tokens": tokens_BL, "domain": self._domain_N[index_B], "present": self._present_NS[index_B],
                "annotated": self._annotated_NS[index_B], "row": index_B}

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.read_batch([int(row)]).items()}

    def __getitems__(self, rows: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """A DataLoader batch read in one pass (one fancy-index of the memory map)."""
        batch = self.read_batch(rows)
        return [{key: value[b] for key, value in batch.items()} for b in range(len(rows))]


def _lists_to_multi_hot(column: pa.ChunkedArray, structures: int) -> np.ndarray:
    """(N, S) bool from lists of model-local indices 1..S."""
    lists = column.combine_chunks()
    values = pc.list_flatten(lists).to_numpy().astype(np.int64)
    parents = pc.list_parent_indices(lists).to_numpy()
    multi_hot_NS = np.zeros((len(lists), structures), dtype=bool)
    multi_hot_NS[parents, values - 1] = True
    return multi_hot_NS


def _multi_hot_to_lists(multi_hot_NS: np.ndarray) -> pa.Array:
    return pa.array([(np.flatnonzero(row) + 1).tolist() for row in multi_hot_NS], pa.list_(pa.int16()))


# ---------------------------------------------------------------- flips


def lateral_axis(affine_16: Sequence[float]) -> int | None:
    """The pixel axis (0 rows, 1 columns) pointing mostly left-right in a row's affine, or None.

    ``affine_16``: row-major 4x4 mapping pixel (row, col, 0, 1) to RAS mm (the index's ``affine``).
    """
    affine = np.asarray(affine_16, dtype=np.float64).reshape(4, 4)
    directions_32 = affine[:3, :2] / np.maximum(np.linalg.norm(affine[:3, :2], axis=0, keepdims=True), 1e-12)
    cosines = np.abs(directions_32[0])  # |x| of the row and column directions
    axis = int(np.argmax(cosines))
    return axis if cosines[axis] >= LATERAL_MIN_COSINE else None


@dataclass(frozen=True)
class FlipTables:
    """Left-right swap in model-local terms: ``label_lut`` (256,) int64 maps a local label to its mirror
    (0 and 255 kept); ``perm_S`` (S,) int64 gives, for structure index t (0-based), the index whose value
    the swapped multi-hot takes (``new[:, t] = old[:, perm_S[t]]``); ``known_S`` (S,) bool: the mirror is
    in the table."""

    label_lut: torch.Tensor
    perm_S: torch.Tensor
    known_S: torch.Tensor


def flip_tables(table: StructureTable) -> FlipTables:
    """:class:`FlipTables` of ``table`` through ``vocab.lateral_swap_lut()``."""
    swap = vocab.lateral_swap_lut()
    to_local = table.vocab_to_local_lut()
    label_lut = torch.arange(256, dtype=torch.int64)
    perm_S = torch.arange(table.num_structures, dtype=torch.int64)
    known_S = torch.ones(table.num_structures, dtype=torch.bool)
    for local, vocab_id in enumerate(table.vocab_ids, start=1):
        mirror = int(to_local[swap[vocab_id]])
        if mirror == IGNORE_LABEL:
            known_S[local - 1] = False
            continue
        label_lut[local] = mirror
        perm_S[local - 1] = mirror - 1
    return FlipTables(label_lut, perm_S, known_S)


# ---------------------------------------------------------------- encoding


@dataclass
class EncodedRows:
    """Encoder output of some rows: tokens (n, L) int64 and their metadata, all NumPy."""

    tokens_NL: np.ndarray
    position_N: np.ndarray
    flipped_N: np.ndarray
    domain_N: np.ndarray
    present_NS: np.ndarray
    annotated_NS: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[EncodedRows]) -> EncodedRows:
        names = ("tokens_NL", "position_N", "flipped_N", "domain_N", "present_NS", "annotated_NS")
        return cls(*(np.concatenate([getattr(part, name) for part in parts]) for name in names))

    def ordered(self) -> EncodedRows:
        """Rows sorted by (flipped, position): originals in split order, then their mirrors."""
        order = np.lexsort((self.position_N, self.flipped_N))
        return EncodedRows(*(getattr(self, name)[order] for name in self.__dataclass_fields__))


def present_from_label(label_BHW: torch.Tensor, annotated_BS: torch.Tensor, min_pixels: int = 1) -> torch.Tensor:
    """(B, S) bool: annotated structures with at least ``min_pixels`` pixels in the model-local label map."""
    batch, structures = annotated_BS.shape
    label_BN = torch.where(label_BHW == IGNORE_LABEL, 0, label_BHW).reshape(batch, -1).long()
    counts_BK = torch.zeros(batch, structures + 1, dtype=torch.int64, device=label_BHW.device)
    counts_BK.scatter_add_(1, label_BN, torch.ones_like(label_BN))
    return (counts_BK[:, 1:] >= min_pixels) & annotated_BS.bool()


def _flip_batch(batch: dict[str, torch.Tensor], axes: list[int], tables: FlipTables) -> dict[str, torch.Tensor]:
    """Mirror rows b along pixel axis ``axes[b]``: images, swapped labels and annotated multi-hots."""
    images, labels = [], []
    for b, axis in enumerate(axes):
        images.append(batch["image"][b].flip(1 + axis))  # (C, H, W): axis 0 → H, 1 → W
        labels.append(tables.label_lut[batch["label"][b]].flip(axis))
    return {**batch, "image": torch.stack(images), "label": torch.stack(labels),
            "annotated": batch["annotated"][:, tables.perm_S]}


def _encode_batch(vqvae: VQVAE, batch: dict[str, torch.Tensor], device: torch.device,
                  min_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, L) int64, present (B, S) bool: >= ``min_pixels`` pixels) of one batch, encoded in float32
    on ``device``."""
    label_BHW = batch["label"].to(device)
    label_in = label_BHW if vqvae.config.num_structures else None
    with torch.autocast(device_type=device.type, enabled=False):
        indices = vqvae.img_to_indices(batch["image"].to(device).float(), batch["channel_mask"].to(device), label_in)
    tokens_BL = vqvae.quantizer.indices_to_tokens(indices)
    present_BS = present_from_label(label_BHW, batch["annotated"].to(device), min_pixels)
    return tokens_BL.cpu().numpy(), present_BS.cpu().numpy()


def _encoded(tokens_BL: np.ndarray, present_BS: np.ndarray, batch: dict[str, torch.Tensor], flipped: bool) -> EncodedRows:
    rows = len(tokens_BL)
    return EncodedRows(tokens_BL, batch["index"].numpy().astype(np.int64), np.full(rows, flipped),
                       batch["domain_index"].numpy().astype(np.int64), present_BS, batch["annotated"].numpy().astype(bool))


def encode_rows(vqvae: VQVAE, dataset: StructureSliceDataset, positions: Sequence[int], config: TokenCacheConfig,
                axes_N: Sequence[int | None] | None = None) -> EncodedRows:
    """Tokenize ``dataset`` rows ``positions`` (and, with ``config.flip``, their mirrors where possible).

    ``axes_N``: per dataset row, its lateral axis (:func:`lateral_axis`) or None; needed for flips.
    """
    device = next(vqvae.parameters()).device
    tables = flip_tables(dataset.table) if config.flip else None
    parts: list[EncodedRows] = []
    positions = list(positions)
    for start in range(0, len(positions), config.batch_size):
        batch = dataset.read_batch(positions[start:start + config.batch_size])
        parts.append(_encoded(*_encode_batch(vqvae, batch, device, config.present_min_pixels), batch, flipped=False))
        if tables is not None:
            mirrored = _mirrorable(batch, axes_N, tables)
            if mirrored:
                sub = {key: value[mirrored] for key, value in batch.items()}
                axes = [axes_N[int(p)] for p in sub["index"].tolist()]
                flipped = _flip_batch(sub, axes, tables)
                parts.append(_encoded(*_encode_batch(vqvae, flipped, device, config.present_min_pixels), flipped,
                                     flipped=True))
    if not parts:
        structures, length = dataset.table.num_structures, vqvae.quantizer.total_tokens
        return EncodedRows(np.zeros((0, length), np.int64), *(np.zeros(0, t) for t in (np.int64, bool, np.int64)),
                           np.zeros((0, structures), bool), np.zeros((0, structures), bool))
    return EncodedRows.concat(parts)


def _mirrorable(batch: dict[str, torch.Tensor], axes_N: Sequence[int | None] | None, tables: FlipTables) -> list[int]:
    """Batch rows with a lateral axis whose annotated structures all have a known mirror."""
    if axes_N is None:
        raise ValueError("flip needs the lateral axis of every row (axes_N)")
    keep = []
    for b, position in enumerate(batch["index"].tolist()):
        annotated_S = batch["annotated"][b]
        if axes_N[position] is not None and bool(tables.known_S[annotated_S].all()):
            keep.append(b)
    return keep


# ---------------------------------------------------------------- building (one or many processes)


def train_view(data: Path, table: StructureTable, domain_names: Sequence[str], vqvae: VQVAE) -> StructureSliceDataset:
    """The train split as the tokenizer sees it: its channel count, its structure table, its image size."""
    base = PreparedSliceDataset(data, split="train", channels_out=vqvae.config.image_channels)
    if len(base) == 0:
        raise ConfigError(data / INDEX_FILE, "has no train rows; expected a prepared dataset with a train split")
    return StructureSliceDataset(base, table, domain_names, vqvae.config.image_size)


def prepare_token_cache(data: str | Path, vqvae: VQVAE, table: StructureTable, domain_names: Sequence[str],
                        tokenizer_sha: str, cache_root: str | Path, config: TokenCacheConfig) -> TokenCache:
    """Open ``cache_root/<key>`` (module doc), building it first when it does not exist.

    ``vqvae``: the tokenizer (eval mode, on the device to encode on); ``table`` / ``domain_names``: its
    structure table and the domain order of ``domain_index``; ``tokenizer_sha``: :func:`tokenizer_sha256`
    of its checkpoint. Call on every rank under torchrun (the ranks share the encoding).
    """
    data, cache_root = Path(data), Path(cache_root)
    index_sha = sha256_file(data / INDEX_FILE)
    key = cache_key(tokenizer_sha, index_sha, vqvae.config.image_size, config.flip, config.present_min_pixels)
    final = cache_root / key
    built = not (final / INFO_FILE).is_file()
    if built:
        info = {"key": key, "tokenizer_sha256": tokenizer_sha, "index_sha256": index_sha, "prepared": str(data.resolve()),
                "image_size": vqvae.config.image_size, "flip": config.flip,
                "present_min_pixels": config.present_min_pixels, "structures": list(table.names),
                "domains": list(domain_names), "patch_sides": list(vqvae.quantizer.patch_sides),
                "codebook_size": vqvae.quantizer.config.codebook_size}
        _build(data, vqvae, table, domain_names, final, config, info)
    else:
        log.info("token cache %s reused", final)
    dist_utils.barrier()
    return TokenCache.open(final, built=built)


def _build(data: Path, vqvae: VQVAE, table: StructureTable, domain_names: Sequence[str], final: Path,
           config: TokenCacheConfig, info: dict[str, Any]) -> None:
    """Each rank encodes its chunk into ``<part>/rank_<r>.npz``; rank 0 merges and renames the folder."""
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    part = final.with_name(f"{PART_PREFIX}{final.name}")
    if rank == 0:
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
    dist_utils.barrier()
    dataset = train_view(data, table, domain_names, vqvae)
    axes_N = [lateral_axis(affine) for affine in read_row_column(dataset.base, "affine")] if config.flip else None
    chunk = np.array_split(np.arange(len(dataset)), world)[rank]
    encoded = encode_rows(vqvae, dataset, chunk.tolist(), config, axes_N)
    np.savez(part / f"rank_{rank:05d}.npz", **{name: getattr(encoded, name) for name in encoded.__dataclass_fields__})
    dist_utils.barrier()
    if rank == 0:
        merged = EncodedRows.concat([_load_part(part / f"rank_{r:05d}.npz") for r in range(world)]).ordered()
        _write_cache(part, merged, dataset, {**info, "rows_original": len(dataset)})
        part.rename(final)
        log.info("token cache %s: %d rows (%d flipped) of %d tokens", final, len(merged.tokens_NL),
                 int(merged.flipped_N.sum()), merged.tokens_NL.shape[1])


def _load_part(path: Path) -> EncodedRows:
    with np.load(path) as arrays:
        return EncodedRows(**{name: arrays[name] for name in EncodedRows.__dataclass_fields__})


def _write_cache(folder: Path, rows: EncodedRows, dataset: StructureSliceDataset, info: dict[str, Any]) -> None:
    """tokens.npy, rows.parquet and cache.json into ``folder`` (the rank files are removed)."""
    dtype = np.int16 if info["codebook_size"] <= np.iinfo(np.int16).max + 1 else np.int32
    tokens = np.lib.format.open_memmap(folder / TOKENS_FILE, mode="w+", dtype=dtype, shape=rows.tokens_NL.shape)
    tokens[:] = rows.tokens_NL.astype(dtype)
    tokens.flush()
    del tokens
    slice_ids = np.asarray(dataset.base.rows.column("slice_id").to_pylist(), dtype=object)[rows.position_N]
    table = pa.table({"position": pa.array(rows.position_N, pa.int64()), "slice_id": pa.array(slice_ids.tolist(), pa.string()),
                      "domain_index": pa.array(rows.domain_N, pa.int16()), "flipped": pa.array(rows.flipped_N, pa.bool_()),
                      "present": _multi_hot_to_lists(rows.present_NS), "annotated": _multi_hot_to_lists(rows.annotated_NS)})
    pq.write_table(table, folder / ROWS_FILE)
    for stale in folder.glob("rank_*.npz"):
        stale.unlink()
    summary = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **info, "rows": len(rows.tokens_NL),
               "rows_flipped": int(rows.flipped_N.sum()), "tokens_per_row": int(rows.tokens_NL.shape[1]),
               "dtype": np.dtype(dtype).name}
    (folder / INFO_FILE).write_text(json.dumps(summary, indent=2) + "\n")


__all__ = [
    "CACHE_DIR",
    "EncodedRows",
    "FlipTables",
    "TokenCache",
    "TokenCacheConfig",
    "TokenDataset",
    "cache_key",
    "encode_rows",
    "flip_tables",
    "lateral_axis",
    "prepare_token_cache",
    "present_from_label",
    "tokenizer_sha256",
    "train_view",
]
