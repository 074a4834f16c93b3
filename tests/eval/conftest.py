"""Shared evaluation fixtures: a real prepared phantom dataset, a generator checkpoint whose lineage names
its train split, and synthetic folders in the layout of ``medaug.synth.layout`` made from phantoms of
other seeds (the synthesis engine is not needed to test the evaluation).

Until ``medaug synthesize`` writes them, a synthetic folder here is a prepared dataset converted into that
layout: its shards copied (optionally transformed), ``manifest.parquet`` with ``synthetic=True`` and the
manifest columns, ``domains.json``/``vocab.json`` copied and a ``synthesize.json`` naming the generator.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.train.conftest import write_tiny_prepared

ImageTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
FRESH_SEED = 7  # phantoms of other subjects than the real dataset's (seed 1)


def _synthetic_intensity(intensity_json: str, modality: str) -> str:
    """A synthetic row's intensity: CT keeps its window, MR the export scale (model [-1, 1] → [0, 1000] a.u.)."""
    from medaug.data.index import intensity_from_json, intensity_to_json
    from medaug.synth.layout import MR_EXPORT_RANGE

    records = intensity_from_json(intensity_json)
    if modality.lower() != "mr":
        return intensity_json
    low, high = MR_EXPORT_RANGE
    return intensity_to_json([{"channel": r.get("channel"), "kind": "mr_export", "low": low, "high": high,
                               "units": "a.u.", "scale": (high - low) / 2, "offset": (high + low) / 2} for r in records])


def _copy_shard(source: Path, shard: str, out: Path, transform: ImageTransform | None, rng: np.random.Generator) -> None:
    from medaug.data.shards import image_path, label_path

    target = image_path(out, shard)
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(label_path(source, shard), label_path(out, shard))
    if transform is None:
        shutil.copy2(image_path(source, shard), target)
        return
    images_NCHW = np.load(image_path(source, shard)).astype(np.float32)
    np.save(target, np.clip(transform(images_NCHW, rng), -1.0, 1.0).astype(np.float16))


def _manifest_columns(count: int, frame, generator_sha256: str) -> dict[str, pa.Array]:
    """The ``medaug.synth.layout.MANIFEST_COLUMNS`` of ``count`` rows, typed as the layout says."""
    from medaug.synth.layout import MANIFEST_COLUMNS, sample_id

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    values = {
        "sample_index": list(range(count)), "sample_id": [sample_id(i) for i in range(count)],
        "target": [None] * count, "target_structures": [[] for _ in range(count)],
        "condition_present": [list(v) for v in frame["structures_present"]],
        "condition_annotated": [list(v) for v in frame["structures_annotated"]],
        "unconditional": [False] * count, "seed": list(range(count)), "cfg": [1.5] * count, "top_k": [900] * count,
        "top_p": [0.96] * count, "temperature": [1.0] * count, "batch_index": [0] * count,
        "batch_size": [count] * count, "batch_position": list(range(count)), "dtype": ["float32"] * count,
        "device": ["cpu"] * count, "generator_sha256": [generator_sha256] * count, "created_at": [now] * count,
        "adherent": [None] * count, "draws": [1] * count,
    }
    return {name: pa.array(values[name], type=dtype) for name, dtype, _ in MANIFEST_COLUMNS}


def write_synthetic_folder(out: Path, sources: Sequence[tuple[Path, Sequence[str] | None]],
                           generator: Path | None = None, transform: ImageTransform | None = None, seed: int = 0) -> Path:
    """Convert rows of prepared datasets into a synthetic folder at ``out`` (module docstring).

    ``sources``: (prepared root, slice ids to take or None for all rows). ``transform(images_NCHW, rng)``
    changes the pixels of every copied shard (model space; clipped back to [-1, 1]). ``generator``: the run
    named in synthesize.json (None: no generator record).
    """
    from medaug.data.index import INDEX_COLUMNS, read_index, rows_to_table, write_index
    from medaug.synth.layout import MANIFEST_FILE, SYNTHESIZE_JSON, SYNTHETIC_DATASET

    rng = np.random.default_rng(seed)
    frames = []
    for root, slice_ids in sources:
        frame = read_index(Path(root) / "index.parquet").to_pandas()
        if slice_ids is not None:
            frame = frame[frame["slice_id"].isin(list(slice_ids))]
        # in index row order (content-defined, ``medaug.prepare.pipeline.content_order``), not by shard name:
        # names hash the source paths, so sorting them would hand each volume other noise in another tmp dir
        for shard in frame["shard"].unique():
            _copy_shard(Path(root), shard, out, transform, rng)
        frames.append(frame)
    import pandas as pd

    frame = pd.concat(frames, ignore_index=True)
    count = len(frame)
    ids = [f"syn_{i:07d}" for i in range(count)]
    frame = frame.assign(dataset=SYNTHETIC_DATASET, subject=ids, patient_group=ids, split=None, synthetic=True,
                         source_image=[[str(generator or "unknown")]] * count, source_label=None, fingerprint=None,
                         intensity=[_synthetic_intensity(i, m) for i, m in zip(frame["intensity"], frame["modality"])])
    table = rows_to_table({name: frame[name].tolist() for name in INDEX_COLUMNS})
    sha = "0" * 64
    for name, array in _manifest_columns(count, frame, sha).items():
        table = table.append_column(name, array)
    write_index(table, out / MANIFEST_FILE)
    first = Path(sources[0][0])
    for name in ("domains.json", "vocab.json"):
        shutil.copy2(first / name, out / name)
    record = {"status": "complete", "counts": {"samples": count}}
    if generator is not None:  # as medaug synthesize records it (medaug.synth.run)
        from medaug.train.checkpoint import latest_checkpoint

        record["generator"] = {"run": str(generator), "checkpoint": str(latest_checkpoint(generator)), "sha256": sha,
                               "weights": "model"}
    (out / SYNTHESIZE_JSON).write_text(json.dumps(record))
    return out


def write_generator_checkpoint(run_dir: Path, prepared: Path) -> Path:
    """A generator run folder whose checkpoint meta.json records ``prepared``'s lineage (train groups) as
    ``medaug train var`` does (:func:`medaug.train.var_task.data_lineage`); its weights are a tiny module's."""
    import torch

    from medaug.data.index import read_index
    from medaug.train.checkpoint import CHECKPOINTS_DIR, save_checkpoint
    from medaug.train.var_task import data_lineage

    splits = read_index(prepared / "index.parquet", columns=["split"]).column("split").to_pylist()
    lineage = data_lineage(prepared, splits.count("train"))
    weights = {"weight": torch.zeros(2, 2)}
    save_checkpoint(run_dir / CHECKPOINTS_DIR, 1, "var", {"model": weights}, metadata={"data": lineage})
    return run_dir


def train_slice_ids(prepared: Path, count: int, domain: str | None = None) -> list[str]:
    """``count`` slice ids of ``prepared``'s train split (of ``domain``), spread over the split, labelled first."""
    from medaug.data.index import read_index

    frame = read_index(prepared / "index.parquet").to_pandas()
    frame = frame[(frame["split"] == "train") & ((frame["domain"] == domain) if domain else True)]
    frame = frame[[len(p) > 0 for p in frame["structures_present"]]]
    picked = np.linspace(0, len(frame) - 1, num=count).round().astype(int)
    return frame["slice_id"].iloc[picked].tolist()


@pytest.fixture(scope="package")
def eval_data(tmp_path_factory) -> dict[str, Path]:
    """``real``: three phantoms per domain at 64² (seed 1, one subject per domain in val, one in test);
    ``fresh``: the same prepared with other subjects (seed 7); ``generator``: a run trained on ``real``."""
    root = tmp_path_factory.mktemp("eval-data")
    real = write_tiny_prepared(root / "real")
    fresh = write_tiny_prepared(root / "fresh", seed=FRESH_SEED)
    generator = write_generator_checkpoint(root / "generator", real)
    return {"real": real, "fresh": fresh, "generator": generator, "root": root}


@pytest.fixture(scope="package")
def synthetic_fresh(eval_data) -> Path:
    """Every slice of the fresh phantoms as a synthetic folder of the generator: new patients, no copies."""
    return write_synthetic_folder(eval_data["root"] / "synthetic-fresh", [(eval_data["fresh"], None)],
                                  generator=eval_data["generator"])


@pytest.fixture(scope="package")
def planted_copies(eval_data) -> list[str]:
    """Slice ids of real training slices planted, unchanged, into :func:`synthetic_with_copies`."""
    return [slice_id for domain in ("ct/abdomen", "mr/brain", "mr/prostate")
            for slice_id in train_slice_ids(eval_data["real"], 2, domain)]


@pytest.fixture(scope="package")
def synthetic_with_copies(eval_data, planted_copies) -> Path:
    """The fresh phantoms plus exact copies of six real training slices (two per domain)."""
    sources = [(eval_data["fresh"], None), (eval_data["real"], planted_copies)]
    return write_synthetic_folder(eval_data["root"] / "synthetic-copies", sources, generator=eval_data["generator"])


# ---------------------------------------------------------------- the own backbone and one full evaluation

FEATURES_STEPS = 20  # a trained encoder, not a good one: the evaluation tests need real features, not AUROC


@pytest.fixture(scope="package")
def features_run(eval_data) -> Path:
    """medaug's own encoder (``recipes/models/features-tiny.yaml``) trained ``FEATURES_STEPS`` steps on the real
    phantoms' train split: the ``medaug`` backbone (a run folder) of the evaluation tests."""
    from medaug.train.features_task import train_features

    out = eval_data["root"] / "features-run"
    train_features(eval_data["real"], "features-tiny", out, max_steps=FEATURES_STEPS,
                   overrides=["train.device=cpu", "train.log_every=10"])
    return out


def light_config(**changes):
    """An :class:`~medaug.eval.evaluate.EvaluateConfig` sized for 30-100 slices (few resamples, small groups)."""
    from medaug.eval.evaluate import EvaluateConfig
    from medaug.eval.metrics import MetricConfig

    settings = {"min_group_size": 5, "grid_per_domain": 3,
                "metrics": MetricConfig(bootstrap=10, kid_subsets=10, kid_subset_size=50)}
    return EvaluateConfig(**{**settings, **changes})


@pytest.fixture(scope="package")
def evaluated(eval_data, synthetic_with_copies, features_run) -> tuple[dict, Path]:
    """``evaluate_metrics`` of :func:`synthetic_with_copies` against the real test split with the own backbone:
    (metrics.json content, report folder)."""
    from medaug.eval.evaluate import evaluate_metrics

    out = eval_data["root"] / "report-copies"
    result = evaluate_metrics(eval_data["real"], synthetic_with_copies, {"medaug": features_run}, out,
                              config=light_config(seconds_per_image=0.25))
    return result, out
