"""The prepared dataset: index schema, pixel shards, torch datasets, patient groups and splits.

* :mod:`medaug.data.index`: the versioned ``index.parquet`` schema (one row per slice), readers, writers.
* :mod:`medaug.data.shards`: ``ShardWriter`` (atomic, resumable, one shard per volume), ``ShardStore``
  (memory-mapped random reads), ``assemble_index``.
* :mod:`medaug.data.dataset`: ``PreparedSliceDataset`` (plain torch) and ``batched_loader``.
* :mod:`medaug.data.splits`: ``slice_fingerprint``, ``merge_patient_groups``, ``assign_splits``,
  ``split_index``.

Names are imported on first use, so ``import medaug.data.index`` does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "INDEX_SCHEMA_VERSION": "index",
    "IndexSchemaError": "index",
    "index_schema": "index",
    "make_slice_id": "index",
    "read_index": "index",
    "read_index_frame": "index",
    "rows_to_table": "index",
    "write_index": "index",
    "ShardError": "shards",
    "ShardStore": "shards",
    "ShardWriter": "shards",
    "assemble_index": "shards",
    "write_assembled_index": "shards",
    "PreparedSliceDataset": "dataset",
    "batched_loader": "dataset",
    "assign_splits": "splits",
    "merge_patient_groups": "splits",
    "slice_fingerprint": "splits",
    "split_index": "splits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medaug.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"medaug.data.{_EXPORTS[name]}"), name)
