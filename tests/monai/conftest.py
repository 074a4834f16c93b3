"""Fixtures of the MONAI integration tests: a tiny prepared phantom dataset (CT abdomen, 1 channel, and MR
prostate, 2 channels, at 64²) and a synthetic folder in the layout of ``medaug.synth.layout``.

Until the synthesis engine lands, :func:`prepared_to_synthetic` makes the synthetic folder by repackaging
prepared train slices as synthesis batches (manifest rows with ``synthetic=True`` and the manifest columns,
batch shards with the generator's channel count). Swap ``synthetic_dir`` for real ``medaug synthesize``
output once it exists; the tests read whatever folder it returns.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medaug.data.index import make_slice_id, rows_to_table, write_index
from medaug.data.shards import shard_stem
from medaug.synth import layout
from tests.train.conftest import write_tiny_prepared

FIXTURE_RUN = "monai-fixture-run"


@pytest.fixture(scope="package")
def prepared_dir(tmp_path_factory) -> Path:
    """Three phantoms each of CT abdomen and MR prostate, prepared at 64² (train/val/test all present)."""
    return write_tiny_prepared(tmp_path_factory.mktemp("monai-data"), domains=["ct_abdomen", "mr_prostate"])


@pytest.fixture(scope="package")
def synthetic_dir(prepared_dir, tmp_path_factory) -> Path:
    """A synthetic folder (manifest.parquet + batch shards) holding the prepared train slices."""
    return prepared_to_synthetic(prepared_dir, tmp_path_factory.mktemp("monai-synthetic") / "synthetic")


def prepared_to_synthetic(prepared: Path, out: Path, split: str = "train", batch_size: int = 4) -> Path:
    """Repackage the ``split`` slices of ``prepared`` as a synthetic folder (module docstring); returns ``out``."""
    rows = [row for row in pq.read_table(prepared / "index.parquet").to_pylist() if row["split"] == split]
    channels_out = max(len(row["channels"]) for row in rows)
    manifest = []
    for batch_index, start in enumerate(range(0, len(rows), batch_size)):
        batch = rows[start:start + batch_size]
        volume_id = layout.batch_id(FIXTURE_RUN, batch_index)
        images_BCHW, labels_BHW = _batch_pixels(prepared, batch, channels_out)
        (out / layout.SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        np.save(out / f"{shard_stem(volume_id)}.image.npy", images_BCHW)
        np.save(out / f"{shard_stem(volume_id)}.label.npy", labels_BHW)
        for position, row in enumerate(batch):
            manifest.append(_synthetic_row(row, out, volume_id, batch_index, len(batch), position, len(manifest)))
    write_index(_manifest_table(manifest), layout.manifest_path(out))
    for name in (layout.DOMAINS_FILE, layout.VOCAB_FILE):
        shutil.copy(prepared / name, out / name)
    (out / layout.SYNTHESIZE_JSON).write_text(json.dumps({"status": "complete", "fixture": FIXTURE_RUN}))
    return out


def _batch_pixels(prepared: Path, batch: list[dict], channels_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, C_max, H, W) float16 zero-filled past each row's channels, and (B, H, W) uint8, from the shards."""
    height, width = batch[0]["height"], batch[0]["width"]
    images_BCHW = np.zeros((len(batch), channels_out, height, width), dtype=np.float16)
    labels_BHW = np.zeros((len(batch), height, width), dtype=np.uint8)
    for position, row in enumerate(batch):
        image_CHW = np.load(prepared / f"{row['shard']}.image.npy", mmap_mode="r")[row["shard_row"]]
        images_BCHW[position, :len(image_CHW)] = image_CHW
        labels_BHW[position] = np.load(prepared / f"{row['shard']}.label.npy", mmap_mode="r")[row["shard_row"]]
    return images_BCHW, labels_BHW


def _synthetic_row(row: dict, out: Path, volume_id: str, batch_index: int, batch_size: int, position: int,
                   sample_index: int) -> dict[str, Any]:
    """A manifest row: the real row's pixels' metadata under the synthetic layout's index and manifest columns."""
    sample = layout.sample_id(sample_index)
    return {
        **row,
        "slice_id": make_slice_id(volume_id, position), "volume_id": volume_id, "dataset": layout.SYNTHETIC_DATASET,
        "subject": sample, "patient_group": sample, "split": None, "source_image": [str(out)], "source_label": None,
        "slice_index": position, "shard": shard_stem(volume_id), "shard_row": position, "fingerprint": None,
        "synthetic": True,
        "sample_index": sample_index, "sample_id": sample, "target": None, "target_structures": [],
        "condition_present": row["structures_present"], "condition_annotated": row["structures_annotated"],
        "unconditional": False, "seed": 1000 + 7 * sample_index, "cfg": 1.5, "top_k": 900, "top_p": 0.96,
        "temperature": 1.0, "batch_index": batch_index, "batch_size": batch_size, "batch_position": position,
        "dtype": "float32", "device": "cpu", "generator_sha256": "0" * 64, "created_at": "2025-01-01T00:00:00Z",
        "adherent": None, "draws": 1,
    }


def _manifest_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Index columns typed by the index schema, manifest columns by ``layout.MANIFEST_COLUMNS``."""
    table = rows_to_table(rows)
    for name, dtype, nullable in layout.MANIFEST_COLUMNS:
        position = table.schema.get_field_index(name)
        table = table.set_column(position, pa.field(name, dtype, nullable), table.column(name).cast(dtype))
    return table
