"""The ``prepare`` batch job: plan → per-volume work (resumable) → finalize (groups, splits, files).

Each volume is prepared independently and written as one unit by the shard writer; its rows file is
written last, so a killed run resumes by skipping complete volumes and a half-written volume never
looks complete. A volume that fails is recorded (one line: file and reason) under ``rejected/`` and the
run goes on. Finalization is a pure function of the completed parts, so a resumed run produces the same
index as an uninterrupted one, and ``medaug merge`` of ``--shard I/N`` runs produces it too.
"""

from __future__ import annotations

import hashlib
import json
import logging

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medaug.config.base import to_dict
from medaug.config.recipes import (
    DatasetRecipe,
    DomainConfig,
    PrepareRecipe,
    SourceEntry,
    load_dataset_recipe,
    resolve_recipe_path,
)
from medaug.errors import ConfigError, MedaugError
from medaug.io.atomic import atomic_output
from medaug.prepare.sources import VolumeTask, discover, load_task

log = logging.getLogger(__name__)

PREPARE_FORMAT_VERSION = 1
REJECTED_DIR = "rejected"


@dataclass(frozen=True)
class PlannedVolume:
    """A volume task with the recipe and domain it is prepared under."""

    task: VolumeTask
    recipe_path: str
    domain: str


@dataclass
class PrepareSummary:
    """What a run did; the CLI renders it as tables or JSON."""

    out: str
    volumes_total: int = 0
    volumes_done: int = 0
    volumes_skipped: int = 0
    volumes_rejected: int = 0
    slices: int = 0
    slices_per_domain: dict[str, int] = field(default_factory=dict)
    slices_per_structure: dict[str, int] = field(default_factory=dict)
    slices_per_split: dict[str, int] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)


ProgressCallback = Callable[[str, int, int], None]  # (message, done, total)


def recipe_for_sources(recipe_path: str | Path, sources: list[str]) -> PrepareRecipe:
    """A prepare recipe from a dataset recipe and SOURCE folders (each read as that dataset)."""
    dataset = load_dataset_recipe(recipe_path)
    if not sources:
        if not dataset.path:
            raise ConfigError(f"{recipe_path}:path", "no SOURCE folder given and the dataset recipe names no default path")
        sources = [str(_resolve_source_path(dataset.path, resolve_recipe_path(recipe_path)))]
    entries = [SourceEntry(path=str(Path(source).resolve()), dataset=str(resolve_recipe_path(recipe_path))) for source in sources]
    return PrepareRecipe(sources=entries, domains={dataset.domain.name: dataset.domain})


def _resolve_source_path(path: str, recipe_file: Path) -> Path:
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return (recipe_file.parent / path).resolve()


def plan(recipe: PrepareRecipe, recipe_dir: Path | None = None) -> tuple[list[PlannedVolume], dict[str, DatasetRecipe]]:
    """Discover every source's volumes; fails before any work on a bad recipe or missing domain."""
    planned, recipes = [], {}
    for number, source in enumerate(recipe.sources):
        where = f"sources[{number}]"
        dataset_path = str(resolve_recipe_path(_relative_to(source.dataset, recipe_dir)))
        dataset = recipes.setdefault(dataset_path, load_dataset_recipe(dataset_path))
        domain_name = source.domain or dataset.domain.name
        if domain_name not in recipe.domains:
            raise ConfigError(f"{where}.domain", f"is {domain_name!r}; allowed: {', '.join(recipe.domains)}")
        _check_channels(dataset, recipe.domains[domain_name], where)
        root = Path(_relative_to(source.path, recipe_dir))
        planned += [PlannedVolume(task, dataset_path, domain_name) for task in discover(root, dataset)]
    return planned, recipes


def _relative_to(path: str, base: Path | None) -> str:
    if base is None or Path(path).is_absolute() or Path(path).exists():
        return path
    candidate = (base / path).resolve()
    return str(candidate) if candidate.exists() else path


def _check_channels(dataset: DatasetRecipe, domain: DomainConfig, where: str) -> None:
    missing = [channel for channel in domain.channels if channel not in dataset.channels]
    if missing:
        raise ConfigError(f"{where}.domain", f"domain {domain.name!r} needs channels {missing} that dataset {dataset.name!r} lacks (it has {dataset.channels})")
    if dataset.domain.modality != domain.modality:
        raise ConfigError(f"{where}.domain", f"domain {domain.name!r} is {domain.modality}; dataset {dataset.name!r} is {dataset.domain.modality}")


def select_shard(planned: list[PlannedVolume], shard: tuple[int, int] | None) -> list[PlannedVolume]:
    """Volumes of shard ``I/N`` (0-based ``I``), by a stable hash of the volume id."""
    if shard is None:
        return planned
    index, count = shard
    return [item for item in planned if int(item.task.volume_id, 16) % count == index]


def run_prepare(
    recipe: PrepareRecipe,
    out: str | Path,
    *,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    recipe_dir: Path | None = None,
    progress: ProgressCallback | None = None,
) -> PrepareSummary:
    """Prepare every volume of ``recipe`` into ``out`` (resumable), then finalize the dataset files."""
    from medaug.data.shards import ShardWriter

    out = Path(out)
    planned, recipes = plan(recipe, recipe_dir)
    planned = select_shard(planned, shard)
    writer = ShardWriter(out)
    _write_json(out / "prepare.partial.json", {"recipe": to_dict(recipe), "shard": shard, "started_at": _now()})
    todo = [item for item in planned if not writer.is_complete(item.task.volume_id)]
    summary = PrepareSummary(out=str(out), volumes_total=len(planned), volumes_skipped=len(planned) - len(todo))
    jobs = [(item, recipes[item.recipe_path], recipe.domains[item.domain], str(out)) for item in todo]
    for done, (item, outcome) in enumerate(_map(prepare_one, jobs, workers), start=1):
        if outcome is None:
            summary.volumes_done += 1
        else:
            summary.volumes_rejected += 1
        if progress:
            progress(item.task.display, done, len(jobs))
    finalize(out, recipe, recipe_dir=recipe_dir, summary=summary)
    return summary


def _map(function, jobs: list, workers: int):
    """Yield ``(job[0], function(*job))`` in job order, in this process or in ``workers`` processes."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job[0], function(*job)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # torch's thread pools do not survive fork
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
        for job, result in zip(jobs, pool.map(function, *zip(*jobs))):
            yield job[0], result


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def prepare_one(item: PlannedVolume, dataset: DatasetRecipe, domain: DomainConfig, out: str) -> dict | None:
    """Prepare one volume; return None on success, or the rejection record (also written to disk)."""
    from medaug.data.shards import ShardWriter

    task = item.task
    try:
        loaded = load_task(task, dataset)
        rows, images, labels = harmonize_task(task, loaded, dataset, domain)
        ShardWriter(out).write_volume(task.volume_id, images, labels, rows)
    except (MedaugError, OSError, ValueError, RuntimeError, MemoryError) as error:
        record = rejection_record(task, item.domain, error)
        _write_json(Path(out) / REJECTED_DIR / f"{task.volume_id}.json", record)
        log.warning("rejected %s", record["reason"])
        return record
    stale = Path(out) / REJECTED_DIR / f"{task.volume_id}.json"
    if stale.exists():
        stale.unlink()
    return None


def rejection_record(task: VolumeTask, domain: str, error: BaseException) -> dict[str, str]:
    reason = str(error) if isinstance(error, MedaugError) else f"{task.display}: {type(error).__name__}: {error}"
    return {
        "volume_id": task.volume_id,
        "dataset": task.dataset,
        "subject": task.subject,
        "domain": domain,
        "source": task.images[0],
        "reason": " ".join(reason.split()),
    }


def harmonize_task(task: VolumeTask, loaded, dataset: DatasetRecipe, domain: DomainConfig):
    """Run harmonization for one loaded volume and build its index rows.

    Returns ``(rows, images_NCHW float16, labels_NHW uint8 | None)``.
    """
    from medaug import vocab
    from medaug.data.splits import slice_fingerprint
    from medaug.prepare.harmonize import harmonize_volume

    image = _select_channels(loaded.image, dataset.channels, domain.channels)
    table = label_table(task, loaded, dataset)
    result = harmonize_volume(
        image,
        loaded.label,
        modality=domain.modality,
        channels=domain.channels,
        intensity={name: to_dict(mapping) for name, mapping in domain.intensity.items()},
        target_spacing_mm=domain.spacing_mm,
        size=domain.size,
        plane=domain.plane,
        min_body_fraction=domain.min_body_fraction,
        label_table=table,
        unmapped=dataset.unmapped,
        vocab_ids=vocab.name_to_id(),
    )
    if len(result.images) == 0:
        raise MedaugError(task.display, "no slice has enough body; expected at least one slice above min_body_fraction")
    fingerprints = [slice_fingerprint(recentre_on_body(slice_CHW[0])) for slice_CHW in result.images]
    rows = build_rows(task, dataset, domain, result, fingerprints)
    labels = result.labels if loaded.label is not None else None
    return rows, result.images.astype(np.float16), labels


def recentre_on_body(image_HW: np.ndarray, background: float = -0.98) -> np.ndarray:
    """The slice shifted (whole pixels, background fill) so that its body's centroid is at the centre.

    Each volume is cropped around its own body, so the same scan arriving as a whole volume and as a
    part of it (e.g. the first 30 slices) lands at different in-plane offsets; fingerprints of the
    recentred slices match anyway.
    """
    body = image_HW > background
    if not body.any():
        return image_HW
    height, width = image_HW.shape
    rows, cols = np.nonzero(body)
    shift_r, shift_c = int(round(height / 2 - rows.mean())), int(round(width / 2 - cols.mean()))
    out = np.full_like(image_HW, -1.0)
    src_r, dst_r = _overlap(shift_r, height)
    src_c, dst_c = _overlap(shift_c, width)
    out[dst_r, dst_c] = image_HW[src_r, src_c]
    return out


def _overlap(shift: int, length: int) -> tuple[slice, slice]:
    if shift >= 0:
        return slice(0, length - shift), slice(shift, length)
    return slice(-shift, length), slice(0, length + shift)


def _select_channels(image, source_channels: list[str], domain_channels: list[str]):
    if list(source_channels) == list(domain_channels):
        return image
    order = [source_channels.index(channel) for channel in domain_channels]
    return image.with_array(image.array[order], channels=list(domain_channels))


def label_table(task: VolumeTask, loaded, dataset: DatasetRecipe) -> dict[int, str]:
    """Source label id → vocabulary name (or ``background``/``ignore``) for this volume's label map."""
    if loaded.label is None:
        return {}
    if loaded.label_names:  # masks folder or DICOM SEG: names come with the file
        from medaug import vocab

        table = {}
        for local_id, name in loaded.label_names.items():
            name = dataset.label_files.get(name, name)
            if name in vocab.VOCABULARY:
                table[local_id] = name
            elif dataset.unmapped == "reject":
                raise MedaugError(task.label or task.display, f"structure {name!r} is not in the vocabulary and the recipe has unmapped: reject; expected a label_files entry")
            else:
                table[local_id] = dataset.unmapped
        return table
    table = dict(dataset.labels)
    for ignore_id in task.extra_ignore_ids:
        table[ignore_id] = "ignore"
    return table


def build_rows(task: VolumeTask, dataset: DatasetRecipe, domain: DomainConfig, result, fingerprints) -> list[dict[str, Any]]:
    """One index row per kept slice (columns of :mod:`medaug.data.index`)."""
    from medaug import vocab

    annotated = sorted(result.structures_annotated)
    rows = []
    for row, slice_index in enumerate(result.slice_indices):
        counts = result.pixel_counts[row] if result.pixel_counts is not None else {}
        present = sorted(counts, key=lambda vocab_id: vocab.by_id(vocab_id).name)
        rows.append(
            {
                "slice_id": f"{task.volume_id}:{int(slice_index):04d}",
                "volume_id": task.volume_id,
                "dataset": dataset.name,
                "subject": task.subject,
                "patient_group": task.patient_group,
                "split": task.pinned_split,
                "domain": domain.name,
                "modality": domain.modality,
                "channels": list(domain.channels),
                "source_image": list(task.images),
                "source_label": task.label,
                "slice_index": int(slice_index),
                "plane": result.plane,
                "height": domain.size,
                "width": domain.size,
                "spacing_mm": [float(domain.spacing_mm)] * 2,
                "slice_thickness_mm": float(result.slice_thickness_mm),
                "affine": np.asarray(result.affines[row], dtype=np.float64).ravel().tolist(),
                "intensity": json.dumps(result.intensity_json),
                "shard_row": row,
                "body_fraction": float(result.body_fractions[row]),
                "structures_annotated": annotated,
                "structures_present": [vocab.by_id(vocab_id).name for vocab_id in present],
                "structure_pixels": [int(counts[vocab_id]) for vocab_id in present],
                "fingerprint": fingerprints[row],
                "synthetic": False,
            }
        )
    return rows


def finalize(out: Path, recipe: PrepareRecipe, *, recipe_dir: Path | None = None, summary: PrepareSummary | None = None) -> PrepareSummary:
    """Turn the completed parts into ``index.parquet``, ``rejected.parquet``, ``domains.json``,
    ``vocab.json`` and ``prepare.json``: merge patient groups by fingerprint, assign splits.

    The index rows are in :func:`content_order`, so a dataset's row order (and with it the training
    order drawn from a seed) does not depend on the folder its sources were read from."""
    from medaug import vocab
    from medaug.data.index import index_schema, write_index
    from medaug.data.shards import assemble_index, completed_volume_ids
    from medaug.data.splits import split_index

    summary = summary or PrepareSummary(out=str(out))
    table = assemble_index(out) if completed_volume_ids(out) else index_schema().empty_table()
    if table.num_rows:
        table = content_order(table)
        pinned = pinned_groups(table)
        distance = None if recipe.fingerprint_merge else -1  # -1 bits: nothing is near enough to merge
        options = {} if distance is None else {"max_distance": distance, "min_slices": 10**9, "min_fraction": 2.0}
        table = split_index(table, fractions=recipe.split_fractions, seed=recipe.split_seed, pinned=pinned, **options)
    write_index(table, out / "index.parquet")
    frame = table.drop_columns(["fingerprint"]).to_pandas()
    rejected = read_rejections(out)
    _write_parquet_records(rejected, out / "rejected.parquet")
    _write_json(out / "domains.json", {name: to_dict(domain) for name, domain in recipe.domains.items()})
    _write_json(out / "vocab.json", {"format_version": 1, "structures": vocab.vocabulary_table()})
    _fill_summary(summary, frame, rejected)
    _write_json(out / "prepare.json", prepare_record(recipe, frame, summary))
    partial = out / "prepare.partial.json"
    if partial.exists():
        partial.unlink()
    return summary


def content_order(table):
    """``table``'s rows sorted by (dataset, subject, domain, source file names, slice_index).

    ``volume_id`` hashes the absolute source paths, so the (volume_id, slice_index) order of
    :func:`~medaug.data.shards.assemble_index` changes when the same sources are read from another
    folder; samplers permute row positions, so the training order would change with it. This key uses
    no directories; ``volume_id`` only breaks the ties left (volumes of one subject whose files share
    their names)."""
    import pyarrow as pa

    names = [json.dumps([dataset, subject, domain, [Path(path).name for path in paths]])
             for dataset, subject, domain, paths in zip(*(table.column(c).to_pylist()
                                                          for c in ("dataset", "subject", "domain", "source_image")))]
    key = "__content_key"
    keyed = table.append_column(key, pa.array(names, pa.string()))
    ordered = keyed.sort_by([(key, "ascending"), ("slice_index", "ascending"), ("volume_id", "ascending")])
    return ordered.drop_columns([key]).combine_chunks()


def pinned_groups(table) -> dict[str, str]:
    """Recipe pins (``splits:`` by subject) as carried by the parts: recipe patient group -> split."""
    pinned: dict[str, str] = {}
    groups = table.column("patient_group").to_pylist()
    for group, split in zip(groups, table.column("split").to_pylist()):
        if split:
            if pinned.setdefault(group, split) != split:
                raise ConfigError(f"splits.{group}", f"patient group is pinned to both {pinned[group]} and {split}; expected one split per group")
    return pinned


def read_rejections(out: Path) -> list[dict[str, str]]:
    folder = out / REJECTED_DIR
    if not folder.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def _fill_summary(summary: PrepareSummary, frame, rejected: list[dict]) -> None:
    summary.slices = int(len(frame))
    summary.rejected = rejected
    summary.volumes_rejected = len(rejected)
    if summary.volumes_total == 0:  # merge / inspect: count what is on disk
        summary.volumes_done = int(frame["volume_id"].nunique()) if len(frame) else 0
        summary.volumes_total = summary.volumes_done + len(rejected)
    if not len(frame):
        return
    summary.slices_per_domain = {str(k): int(v) for k, v in frame["domain"].value_counts().sort_index().items()}
    summary.slices_per_split = {str(k): int(v) for k, v in frame["split"].value_counts().sort_index().items()}
    counts: dict[str, int] = {}
    for present in frame["structures_present"]:
        for name in present:
            counts[name] = counts.get(name, 0) + 1
    summary.slices_per_structure = dict(sorted(counts.items()))


def prepare_record(recipe: PrepareRecipe, frame, summary: PrepareSummary) -> dict[str, Any]:
    """``prepare.json``: resolved config, software version, input checksums, counts."""
    from medaug import __version__

    inputs = sorted({path for paths in frame["source_image"] for path in paths}) if len(frame) else []
    labels = sorted({path for path in frame["source_label"] if isinstance(path, str) and path}) if len(frame) else []
    return {
        "format_version": PREPARE_FORMAT_VERSION,
        "medaug_version": __version__,
        "created_at": _now(),
        "recipe": to_dict(recipe),
        "inputs": {path: file_checksum(path) for path in inputs + labels},
        "counts": {
            "volumes": int(frame["volume_id"].nunique()) if len(frame) else 0,
            "slices": summary.slices,
            "rejected": summary.volumes_rejected,
            "slices_per_domain": summary.slices_per_domain,
            "slices_per_split": summary.slices_per_split,
            "slices_per_structure": summary.slices_per_structure,
        },
    }


def file_checksum(path: str) -> str:
    """sha256 of a file, or of a folder's files in name order (DICOM series, mask folders)."""
    target = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    for file in files:
        if target.is_dir():
            digest.update(str(file.relative_to(target)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, payload: Any) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, default=str))


def _write_parquet_records(records: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["volume_id", "dataset", "subject", "domain", "source", "reason"]
    table = pa.table({column: pa.array([record.get(column, "") for record in records], pa.string()) for column in columns})
    with atomic_output(path) as temporary:
        pq.write_table(table, temporary)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


__all__ = ["run_prepare", "recipe_for_sources", "plan", "finalize", "PrepareSummary"]
