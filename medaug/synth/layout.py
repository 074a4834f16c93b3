"""The folder ``medaug synthesize`` writes (DESIGN §3 "Synthetic output"), and its manifest columns.

A synthetic folder is also a prepared dataset: its rows follow the index schema (``medaug.data.index``)
with ``synthetic=True`` and the synthesis columns below, its pixels sit in the same memory-mappable
shards, and ``domains.json``/``vocab.json`` come from the generator. So everything that reads a prepared
dataset (``PreparedSliceDataset``, ``medaug.monai``, ``medaug evaluate``) reads synthetic samples too.

Layout under ``OUT``::

    synthesize.json      settings, generator (path, sha256), plan summary, status "running" | "complete",
                         counts, per-structure condition adherence; written first and rewritten at the end
    plan.parquet         the whole plan, one row per sample (written before the first batch; a resumed run
                         refuses a different plan)
    domains.json         the generator's domain table (as ``medaug prepare`` writes it)
    vocab.json           the generator's structures (vocabulary records)
    shards/<batch_id>.image.npy   (B, C_max, H, W) float16 model space [-1, 1] (zeros past a domain's channels)
    shards/<batch_id>.label.npy   (B, H, W) uint8 vocabulary ids (0 background)
    parts/<batch_id>.parquet      the batch's manifest rows; written LAST, after every export file of the batch,
                                  so a batch with a parts file is complete (``--resume`` skips it)
    manifest.parquet     all rows sorted by ``sample_index`` (index schema + the columns below)
    png/ nifti/ dicom/   exported files, named by ``sample_id`` (``medaug.synth.export``)

A batch is one "volume" of the index schema: ``volume_id`` = ``batch_id`` (16 hex characters derived from
the run's ``run_uid`` and the batch index), ``slice_index`` = position in the batch. Index columns of
a synthetic row: ``dataset`` "medaug-synthetic", ``subject`` and ``patient_group`` = ``sample_id``,
``split`` null, ``source_image`` [generator run folder], ``source_label`` null, ``affine`` the domain's
canonical slice affine, ``intensity`` the domain's export mapping (CT: the domain's HU window; MR: model
[-1, 1] → [0, 1000] a.u.), ``structures_present``/``structure_pixels`` measured on the generated mask,
``structures_annotated`` the condition's annotated set, ``fingerprint`` null.

Synthesis columns (``MANIFEST_COLUMNS``):

======================  ==================  ==========================================================
column                  type                meaning
======================  ==================  ==========================================================
sample_index            int64               position in the plan, 0..n-1
sample_id               string              ``syn_0000042``: names every exported file of the sample
target                  string (nullable)   the requested name (``--organ prostate``) this sample serves
target_structures       list<string>        the model's structures the target resolves to
condition_present       list<string>        the condition's present set (drawn from real train rows)
condition_annotated     list<string>        the condition's annotated set
unconditional           bool                the null condition was used
seed                    int64               the sampler seed of the kept draw (the plan's seed when ``draws`` is 1)
cfg                     double              guidance at the last scale (ramped over scales)
top_k                   int32               0 = all tokens
top_p                   double              1 = all tokens
temperature             double
batch_index             int32               which batch of the plan
batch_size              int32               rows sampled together
batch_position          int32               row inside the batch
dtype                   string              ``float32`` or ``bfloat16`` (autocast of the transformer)
device                  string              e.g. ``cpu`` or ``cuda (NVIDIA H200)``
generator_sha256        string              content hash of the generator checkpoint's weights
created_at              string              ISO 8601 UTC time the batch was written
adherent                bool (nullable)     the mask shows the target: its structures cover >= the generator's
                                            ``conditioning.min_pixels`` pixels; null with no target
draws                   int16               1 + how often the sample was drawn again because its mask missed
                                            its target (``--redraws``); the seed is ``plan.draw_seed(plan seed, draws)``
======================  ==================  ==========================================================

Regenerating a row: load the generator, sample ``[condition]`` with ``seed``, ``cfg``, ``top_k``, ``top_p``,
``temperature`` and ``dtype`` on ``device`` (``medaug.synth.engine.regenerate``); every sample depends only on its
own seed and condition, not on its batch neighbours.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa

from medaug.data.shards import MANIFEST_FILE, PARTS_DIR, SHARDS_DIR

SYNTHESIZE_JSON = "synthesize.json"
PLAN_FILE = "plan.parquet"
DOMAINS_FILE = "domains.json"
VOCAB_FILE = "vocab.json"
SYNTHETIC_DATASET = "medaug-synthetic"
SAMPLE_PREFIX = "syn"
MR_EXPORT_RANGE = (0.0, 1000.0)  # a.u.: model -1 → 0, +1 → 1000 for every synthetic MR channel

MANIFEST_COLUMNS: tuple[tuple[str, pa.DataType, bool], ...] = (
    ("sample_index", pa.int64(), False),
    ("sample_id", pa.string(), False),
    ("target", pa.string(), True),
    ("target_structures", pa.list_(pa.string()), False),
    ("condition_present", pa.list_(pa.string()), False),
    ("condition_annotated", pa.list_(pa.string()), False),
    ("unconditional", pa.bool_(), False),
    ("seed", pa.int64(), False),
    ("cfg", pa.float64(), False),
    ("top_k", pa.int32(), False),
    ("top_p", pa.float64(), False),
    ("temperature", pa.float64(), False),
    ("batch_index", pa.int32(), False),
    ("batch_size", pa.int32(), False),
    ("batch_position", pa.int32(), False),
    ("dtype", pa.string(), False),
    ("device", pa.string(), False),
    ("generator_sha256", pa.string(), False),
    ("created_at", pa.string(), False),
    ("adherent", pa.bool_(), True),
    ("draws", pa.int16(), False),
)


def sample_id(sample_index: int) -> str:
    """The file-name safe id of plan row ``sample_index`` (``syn_0000042``)."""
    return f"{SAMPLE_PREFIX}_{sample_index:07d}"


def batch_id(run_uid: str, batch_index: int) -> str:
    """The 16-hex-character ``volume_id`` of batch ``batch_index`` of run ``run_uid``."""
    return hashlib.sha1(f"{run_uid}:{batch_index}".encode()).hexdigest()[:16]


def manifest_path(root: str | Path) -> Path:
    return Path(root) / MANIFEST_FILE


def is_synthetic_folder(root: str | Path) -> bool:
    """True for a folder ``medaug synthesize`` wrote (its ``synthesize.json`` exists)."""
    return (Path(root) / SYNTHESIZE_JSON).is_file()


__all__ = [
    "DOMAINS_FILE",
    "MANIFEST_COLUMNS",
    "MANIFEST_FILE",
    "MR_EXPORT_RANGE",
    "PARTS_DIR",
    "PLAN_FILE",
    "SHARDS_DIR",
    "SYNTHESIZE_JSON",
    "SYNTHETIC_DATASET",
    "VOCAB_FILE",
    "batch_id",
    "is_synthetic_folder",
    "manifest_path",
    "sample_id",
]
