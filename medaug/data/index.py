"""The slice index: ``index.parquet``, one row per prepared slice (schema version 1).

The parquet file's key-value metadata holds ``medaug.index_schema_version`` (``INDEX_SCHEMA_VERSION``);
:func:`read_index` refuses a file without it, with another version, or missing a column, with a one-line
:class:`IndexSchemaError` naming the file. Extra columns are allowed and kept (synthetic manifests add
the condition vector, ``seed``, ``cfg``...): later issues extend the index without a version bump as
long as the columns below keep their names and types.

Columns (``nullable`` ones may hold nulls; all others must not):

=====================  =============================  =======  ====================================================
column                 type                           unit     meaning
=====================  =============================  =======  ====================================================
slice_id               string                         --       ``f"{volume_id}:{slice_index:04d}"``; stable id
volume_id              string                         --       16 hex chars, content-derived (sha1 of dataset,
                                                               subject, source paths...); names the shard
dataset                string                         --       source dataset and version (recipe name)
subject                string                         --       subject id inside the source dataset
patient_group          string                         --       split unit; recipe group, then merged across
                                                               datasets by slice fingerprints (``splits.py``)
split                  string (nullable)              --       ``train`` / ``val`` / ``test``; null in the
                                                               per-volume parts before splitting
domain                 string                         --       domain name, e.g. ``ct/abdomen`` (``domains.json``)
modality               string                         --       ``CT`` or ``MR``
channels               list<string>                   --       the domain's channel names, in pixel order
source_image           list<string>                   --       source image path(s), one per file read
source_label           string (nullable)              --       source label path; null for image-only sources
slice_index            int32                          voxel    index along the slicing axis of the RAS volume
plane                  string                         --       ``axial`` / ``coronal`` / ``sagittal``
height                 int32                          pixel    rows of the stored slice
width                  int32                          pixel    columns of the stored slice
spacing_mm             list<float>                    mm       [row, col] pixel spacing
slice_thickness_mm     float                          mm       spacing along the slicing axis
affine                 fixed_size_list<double>[16]    mm       row-major 4x4: pixel (row, col, 0, 1) -> RAS mm
intensity              string                         --       JSON list, one object per channel: the mapping
                                                               from model space [-1, 1] back to source units
                                                               (kind, low, high, scale, offset, units...)
shard                  string                         --       shard stem relative to the dataset root,
                                                               e.g. ``shards/<volume_id>`` (``shards.py``)
shard_row              int32                          --       row of this slice inside its shard
body_fraction          float                          --       fraction of the slice's pixels inside the body
structures_annotated   list<string>                   --       vocabulary names the source labels at all
structures_present     list<string>                   --       vocabulary names with >= 1 pixel in this slice
structure_pixels       list<int32>                    pixel    pixel count per ``structures_present`` entry
fingerprint            binary (nullable)              --       perceptual hash of the harmonized slice
                                                               (``splits.slice_fingerprint``); empty when the
                                                               slice carries too little structure to match
synthetic              bool                           --       False for real slices
=====================  =============================  =======  ====================================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medaug.errors import MedaugError
from medaug.io.atomic import atomic_output

if TYPE_CHECKING:
    import pandas as pd

INDEX_SCHEMA_VERSION = 1
VERSION_KEY = b"medaug.index_schema_version"
SPLITS = ("train", "val", "test")

# (name, type, nullable), in file order; the module docstring documents each one.
_COLUMNS: tuple[tuple[str, pa.DataType, bool], ...] = (
    ("slice_id", pa.string(), False),
    ("volume_id", pa.string(), False),
    ("dataset", pa.string(), False),
    ("subject", pa.string(), False),
    ("patient_group", pa.string(), False),
    ("split", pa.string(), True),
    ("domain", pa.string(), False),
    ("modality", pa.string(), False),
    ("channels", pa.list_(pa.string()), False),
    ("source_image", pa.list_(pa.string()), False),
    ("source_label", pa.string(), True),
    ("slice_index", pa.int32(), False),
    ("plane", pa.string(), False),
    ("height", pa.int32(), False),
    ("width", pa.int32(), False),
    ("spacing_mm", pa.list_(pa.float32()), False),
    ("slice_thickness_mm", pa.float32(), False),
    ("affine", pa.list_(pa.float64(), 16), False),
    ("intensity", pa.string(), False),
    ("shard", pa.string(), False),
    ("shard_row", pa.int32(), False),
    ("body_fraction", pa.float32(), False),
    ("structures_annotated", pa.list_(pa.string()), False),
    ("structures_present", pa.list_(pa.string()), False),
    ("structure_pixels", pa.list_(pa.int32()), False),
    ("fingerprint", pa.binary(), True),
    ("synthetic", pa.bool_(), False),
)
INDEX_COLUMNS: tuple[str, ...] = tuple(name for name, _, _ in _COLUMNS)
# Columns a row may leave out when built; they take these values.
_DEFAULTS: dict[str, Any] = {"split": None, "source_label": None, "fingerprint": None, "synthetic": False}


class IndexSchemaError(MedaugError):
    """An index (or index part) file is not a medaug index of a version this code reads."""


def index_schema() -> pa.Schema:
    """The version-1 index schema (columns in file order), with the version in its metadata."""
    fields = [pa.field(name, dtype, nullable=nullable) for name, dtype, nullable in _COLUMNS]
    return pa.schema(fields, metadata={VERSION_KEY: str(INDEX_SCHEMA_VERSION).encode()})


def make_slice_id(volume_id: str, slice_index: int) -> str:
    """The stable slice id ``"<volume_id>:<slice_index, 4 digits>"``."""
    return f"{volume_id}:{int(slice_index):04d}"


def intensity_to_json(mappings: Sequence[Mapping[str, Any]]) -> str:
    """Serialize per-channel intensity mappings (one dict per channel) for the ``intensity`` column."""
    return json.dumps([dict(m) for m in mappings], sort_keys=True, default=_json_scalar)


def intensity_from_json(text: str) -> list[dict[str, Any]]:
    """The per-channel intensity mappings stored in one row's ``intensity`` value."""
    return json.loads(text)


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the intensity JSON")


def rows_to_table(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
                  extra_types: Mapping[str, pa.DataType] | None = None) -> pa.Table:
    """Build an index table from rows (list of dicts) or columns (dict of lists).

    Index columns get their schema type and are checked for nulls; ``split``, ``source_label``,
    ``fingerprint`` and ``synthetic`` may be left out (null / null / null / False). ``affine`` accepts
    (4, 4) arrays or 16 numbers per row; ``intensity`` accepts a JSON string or a list of dicts per row.
    Extra columns follow the index columns with their type from ``extra_types`` where named there (so
    that parts written separately share one schema), else pyarrow's inferred type. Raises
    :class:`IndexSchemaError` naming the missing or bad column.
    """
    columns = _as_columns(rows)
    length = _column_length(columns)
    for name, value in _DEFAULTS.items():
        columns.setdefault(name, [value] * length)
    missing = [name for name in INDEX_COLUMNS if name not in columns]
    if missing:
        raise IndexSchemaError("index rows", f"missing columns {missing}; expected all of {list(INDEX_COLUMNS)}")
    arrays = [_index_array(name, columns[name]) for name in INDEX_COLUMNS]
    extras = [name for name in columns if name not in INDEX_COLUMNS]
    extra_types = extra_types or {}
    arrays += [pa.array(columns[name], type=extra_types.get(name)) for name in extras]
    schema = _extend_schema([pa.field(name, array.type) for name, array in zip(extras, arrays[len(INDEX_COLUMNS):])])
    table = pa.Table.from_arrays(arrays, schema=schema)
    validate_index(table, "index rows")
    return table


def _as_columns(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
    if isinstance(rows, Mapping):
        return {name: list(values) for name, values in rows.items()}
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in rows] for name in names}


def _column_length(columns: Mapping[str, list[Any]]) -> int:
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        sizes = {name: len(values) for name, values in columns.items()}
        raise IndexSchemaError("index rows", f"columns have different lengths {sizes}; expected one length")
    return lengths.pop() if lengths else 0


def _index_array(name: str, values: list[Any]) -> pa.Array:
    dtype = index_schema().field(name).type
    if name == "affine":
        try:
            flat_N16 = np.asarray(values, dtype=np.float64).reshape(len(values), 16)
        except (TypeError, ValueError):
            raise IndexSchemaError("index rows", "column 'affine' needs a 4x4 matrix or 16 numbers per row") from None
        return pa.FixedSizeListArray.from_arrays(pa.array(flat_N16.reshape(-1)), 16)
    if name == "split":  # "" (not split yet) is stored as null
        values = [None if v == "" else v for v in values]
    if name == "intensity":
        values = [v if isinstance(v, str) or v is None else intensity_to_json(v) for v in values]
    if pa.types.is_list(dtype):  # lists, tuples and numpy arrays (pandas hands list cells over as arrays)
        values = [None if v is None else np.asarray(v).tolist() for v in values]
    try:
        return pa.array(values, type=dtype)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as error:
        raise IndexSchemaError("index rows", f"column {name!r} does not convert to {dtype}: {error}") from None


def _extend_schema(extra_fields: Sequence[pa.Field]) -> pa.Schema:
    """The index schema followed by ``extra_fields`` (kept in their order), version in the metadata."""
    schema = index_schema()
    for field in extra_fields:
        schema = schema.append(field)
    return schema.with_metadata({VERSION_KEY: str(INDEX_SCHEMA_VERSION).encode()})


def validate_index(table: pa.Table, where: str | Path) -> None:
    """Check columns, types, nulls and split values of an in-memory index table."""
    _check_columns(table.schema, where)
    for name, _, nullable in _COLUMNS:
        if not nullable and table.column(name).null_count:
            raise IndexSchemaError(where, f"column {name!r} has {table.column(name).null_count} nulls; expected none")
    splits = set(pc.unique(table.column("split").drop_null()).to_pylist())
    if not splits <= set(SPLITS):
        raise IndexSchemaError(where, f"column 'split' holds {sorted(splits - set(SPLITS))}; expected {list(SPLITS)}")
    bad = _mismatched_structure_pixels(table)
    if bad is not None:
        raise IndexSchemaError(where, f"row {bad}: structure_pixels and structures_present differ in length")


def _mismatched_structure_pixels(table: pa.Table) -> int | None:
    present = pc.list_value_length(table.column("structures_present")).to_numpy(zero_copy_only=False)
    pixels = pc.list_value_length(table.column("structure_pixels")).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(present != pixels)
    return int(bad[0]) if bad.size else None


def _check_columns(schema: pa.Schema, where: str | Path) -> None:
    names = set(schema.names)
    missing = [name for name in INDEX_COLUMNS if name not in names]
    if missing:
        raise IndexSchemaError(where, f"missing index columns {missing}")
    expected = index_schema()
    for name in INDEX_COLUMNS:
        found = schema.field(name).type
        if found != expected.field(name).type:
            raise IndexSchemaError(where, f"column {name!r} has type {found}; expected {expected.field(name).type}")


def _check_version(schema: pa.Schema, where: str | Path) -> None:
    metadata = schema.metadata or {}
    if VERSION_KEY not in metadata:
        raise IndexSchemaError(where, f"no {VERSION_KEY.decode()} in the parquet metadata; not a medaug index")
    version = metadata[VERSION_KEY].decode()
    if version != str(INDEX_SCHEMA_VERSION):
        expected = f"this medaug reads version {INDEX_SCHEMA_VERSION}"
        raise IndexSchemaError(where, f"index schema version {version}; {expected}")


def write_index(table: pa.Table | pd.DataFrame, path: str | Path, fsync: bool = False) -> Path:
    """Validate ``table`` and write it to ``path`` atomically (temp file, then rename), zstd-compressed.

    A pandas DataFrame (e.g. ``read_index(...).to_pandas()`` after edits) is converted with
    :func:`rows_to_table`. ``fsync`` flushes the file to disk before the rename (survives power loss,
    not only a kill).
    """
    path = Path(path)
    if not isinstance(table, pa.Table):
        table = rows_to_table({name: table[name].tolist() for name in table.columns})
    validate_index(table, path)
    metadata = {**(table.schema.metadata or {}), VERSION_KEY: str(INDEX_SCHEMA_VERSION).encode()}
    table = table.replace_schema_metadata(metadata)
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
    return path


def read_index_schema(path: str | Path) -> pa.Schema:
    """The schema of an index file, after checking its version and columns (reads only the footer)."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise IndexSchemaError(path, f"not readable as parquet ({error})") from None
    _check_version(schema, path)
    _check_columns(schema, path)
    return schema


def read_index(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Read an index (or index part) file as a pyarrow Table, checking version and columns first.

    ``columns`` selects a subset (faster for large indexes); extra columns are returned as stored.
    Raises :class:`IndexSchemaError` naming the file: not parquet, wrong version, missing columns.
    """
    read_index_schema(path)
    return pq.read_table(path, columns=None if columns is None else list(columns))


def read_index_frame(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`read_index` as a pandas DataFrame (list columns become object columns of arrays)."""
    return read_index(path, columns).to_pandas()
