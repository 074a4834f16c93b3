"""``medaug synthesize``: plan → batches through the generator → exports + manifest, resumable, under torchrun.

The folder it writes is described in :mod:`medaug.synth.layout`. The steps:

1. Load the generator (:class:`~medaug.synth.engine.SynthGenerator`) and make the plan
   (:func:`~medaug.synth.plan.make_plan`); ``dry_run`` stops here.
2. Rank 0 claims the output folder: a new or empty folder gets ``synthesize.json`` (status ``running``, a fresh
   ``run_uid``), ``plan.parquet``, ``domains.json`` and ``vocab.json``. A folder holding a run is refused unless
   ``resume``; a resumed run must have the same plan, sampler settings, generator weights and formats (else a
   one-line error names what differs) and keeps its ``run_uid``; a complete run is left as it is.
3. Every rank takes the batches ``b ≡ rank (mod world_size)``, skips those whose parts file exists, and for
   the others generates, draws again the samples whose masks miss their target (``redraws``,
   :func:`redraw_missing`), exports every format (each file atomically; files that exist are kept), then writes
   the batch's shards and, last, its parts file. A kill at any point loses at most the batches in flight, and
   ``--resume`` redoes exactly those: no duplicates, no gaps.
4. After a barrier, rank 0 assembles ``manifest.parquet`` (sorted by ``sample_index``), the montage and the
   nnU-Net ``dataset.json`` files, computes condition adherence, and marks ``synthesize.json`` complete.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medaug.config.base import to_dict
from medaug.data.index import INDEX_SCHEMA_VERSION, read_index, write_index
from medaug.data.shards import ShardWriter, assemble_index
from medaug.errors import ConfigError
from medaug.synth import layout
from medaug.synth.engine import GeneratedBatch, SynthGenerator, domain_plane, export_affine, export_intensity
from medaug.synth.export.base import ExportSlice
from medaug.synth.export.nifti import NiftiOptions
from medaug.synth.export.png import PngOptions
from medaug.synth.plan import Plan, PlannedSample, PlanRequest, draw_seed, make_plan, plan_summary

log = logging.getLogger(__name__)

FORMATS = ("png", "nifti", "nnunet", "dicom")
MONTAGE_FILE = "montage.png"
NNUNET_DIR = "nnunet"
STATUS_RUNNING, STATUS_COMPLETE = "running", "complete"
BODY_THRESHOLD = -0.9  # model space: a pixel with any channel above this counts as body (background is -1)
# Settings a resumed run must share with the run it finishes.
RESUME_KEYS = ("plan_sha256", "sampling", "generator_sha256", "formats", "dtype", "batch_size", "redraws")
# What a run started before a setting existed used (its synthesize.json has no such key).
SETTINGS_BEFORE_KEY = {"redraws": 0}

Progress = Callable[[int, int, float], None]  # (samples done, samples planned, images per second)


@dataclass(frozen=True)
class ExportSettings:
    """Which files each sample gets. ``formats``: any of png, nifti, nnunet, dicom. ``nnunet_id``: the first
    nnU-Net dataset number (one dataset per domain: ``Dataset{id + i}_medaug_{domain}``). ``montage``: how
    many samples the overview montage shows (0: none)."""

    formats: tuple[str, ...] = ("png",)
    png: PngOptions = field(default_factory=PngOptions)
    nifti: NiftiOptions = field(default_factory=NiftiOptions)
    dicom: Any = None  # medaug.synth.export.dicom.DicomOptions fields as a dict (sop, seg); None = defaults
    nnunet_id: int = 900
    workers: int = 2
    montage: int = 64

    def __post_init__(self) -> None:
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown:
            raise ConfigError("--format", f"{','.join(unknown)} unknown; expected a comma list of {', '.join(FORMATS)}")
        if not 0 <= self.nnunet_id <= 999:
            raise ConfigError("--nnunet-id", f"is {self.nnunet_id}; expected 0..999")


@dataclass
class SynthesisResult:
    """What a call did: the summary (synthesize.json content) and this rank's counts."""

    summary: dict[str, Any]
    generated: int = 0
    skipped_batches: int = 0
    seconds: float = 0.0
    first_batch_seconds: float = 0.0  # until the first batch was generated: loading, compiling, graph capture
    first_batch_samples: int = 0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "export": 0.0, "record": 0.0})


def plan_sha256(plan: Plan) -> str:
    """Content hash of the plan table (what ``--resume`` compares)."""
    import hashlib

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, plan.to_table().schema) as writer:
        writer.write_table(plan.to_table())
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def synthesize(run: str | Path, out: str | Path, request: PlanRequest, export: ExportSettings = ExportSettings(), *,
               device: str = "auto", dtype: str | None = None, resume: bool = False, dry_run: bool = False,
               progress: Progress | None = None, compile_decoder: bool | None = None) -> SynthesisResult:
    """Plan, generate and export ``request`` with the generator ``run`` into ``out`` (module docstring).

    ``compile_decoder``: :class:`~medaug.synth.engine.SynthGenerator`'s (None: by the run's size); a resumed
    run decodes as it started.

    Works alone or under ``torchrun`` (one process per GPU, or gloo on CPUs). Returns the summary that
    ``synthesize.json`` holds (the plan summary only for ``dry_run``).
    """
    from medaug.train import distributed

    info = distributed.setup(device)
    try:
        generator = SynthGenerator(run, info.device, dtype, compile_decoder=compile_decoder)
        plan = make_plan(request, generator.bank, generator.domain_names, generator.reconstruction_quality())
        generator.expected_samples = len(plan.samples)  # whether compiling the decoder pays: the whole run's size
        for warning in plan.warnings if info.is_rank0 else ():
            log.warning("%s", warning)
        if dry_run:
            return SynthesisResult({"plan": plan_summary(plan), "dry_run": True})
        return _run(generator, plan, Path(out), export, resume, info, progress)
    finally:
        distributed.teardown(info)


def _run(generator: SynthGenerator, plan: Plan, out: Path, export: ExportSettings, resume: bool,
         info: Any, progress: Progress | None) -> SynthesisResult:
    from medaug.train import distributed

    record = _settings_record(generator, plan, export)
    claim: dict[str, Any] | Exception = {}
    if info.is_rank0:
        try:
            claim = claim_folder(out, record, plan, generator, resume)
        except Exception as error:  # every rank must leave the barrier below, then raise
            claim = error
    claims = distributed.all_gather_objects(claim if not isinstance(claim, Exception) else {"error": str(claim)})
    if isinstance(claim, Exception):
        raise claim
    if "error" in claims[0]:
        raise ConfigError(out, claims[0]["error"])
    state = json.loads((out / layout.SYNTHESIZE_JSON).read_text())
    if state["status"] == STATUS_COMPLETE:
        return SynthesisResult(state, skipped_batches=plan.num_batches)
    generator.adopt_decoder(state["settings"].get("decoder"))  # a resumed run decodes as it started
    generator.adopt_sampler(state["settings"].get("sampler"))  # and samples as it started
    result = generate_batches(generator, plan, out, export, state["run_uid"], info.rank, info.world_size, progress)
    distributed.barrier()
    if info.is_rank0:
        result.summary = finalize(out, plan, generator, export, state, result)
    distributed.barrier()
    if not info.is_rank0:
        result.summary = json.loads((out / layout.SYNTHESIZE_JSON).read_text())
    return result


def _settings_record(generator: SynthGenerator, plan: Plan, export: ExportSettings) -> dict[str, Any]:
    return {"plan_sha256": plan_sha256(plan), "sampling": to_dict(plan.request.sampling),
            "generator_sha256": generator.sha256, "formats": sorted(export.formats), "dtype": generator.dtype,
            "batch_size": plan.request.batch_size, "redraws": plan.request.redraws,
            "decoder": generator.decoder_record(), "sampler": generator.sampler_record()}


def claim_folder(out: Path, record: dict[str, Any], plan: Plan, generator: SynthGenerator, resume: bool) -> dict[str, Any]:
    """Rank 0: start a run in ``out`` or check that ``resume`` continues the one there (module docstring)."""
    from medaug.train.checkpoint import write_json

    state_path = out / layout.SYNTHESIZE_JSON
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if not resume:
            raise ConfigError(out, f"holds a synthesis run ({state.get('status')}); expected a new folder, or "
                              "--resume to finish it")
        for key in RESUME_KEYS:
            started = state["settings"].get(key, SETTINGS_BEFORE_KEY.get(key))
            if started != record[key]:
                hint = f" (--redraws {started})" if key == "redraws" else ""
                raise ConfigError(out, f"was started with another {key} ({started!r}, now {record[key]!r}); expected "
                                  f"the same request to resume{hint}")
        ShardWriter(out).cleanup_stale()
        return state
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(out, "exists and is not empty; expected a new or empty folder for the samples")
    out.mkdir(parents=True, exist_ok=True)
    write_index_free_table(plan.to_table(), out / layout.PLAN_FILE)
    write_json(out / layout.DOMAINS_FILE, generator.domains)
    write_json(out / layout.VOCAB_FILE, generator.meta["vocabulary"])
    state = {"format": "medaug-synthesis", "version": 1, "status": STATUS_RUNNING, "run_uid": uuid.uuid4().hex,
             "created_at": _now(), "generator": {"run": str(generator.run_dir.resolve()),
                                                 "checkpoint": str(generator.checkpoint.resolve()),
                                                 "sha256": generator.sha256,
                                                 "weights": generator.meta["loaded_weights"]["stem"]},
             "settings": record, "plan": plan_summary(plan), "export": _export_record(plan, generator)}
    write_json(state_path, state)
    return state


def _export_record(plan: Plan, generator: SynthGenerator) -> dict[str, Any]:
    return {"intensity": {d: export_intensity(generator.domains[d]) for d in sorted(set(s.domain for s in plan.samples))},
            "mr_export_range_au": list(layout.MR_EXPORT_RANGE)}


def write_index_free_table(table: pa.Table, path: Path) -> None:
    """A parquet file that is not an index (the plan), written atomically."""
    import pyarrow.parquet as pq

    from medaug.io.atomic import atomic_output

    with atomic_output(path) as temporary:
        pq.write_table(table, temporary)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- batches


def generate_batches(generator: SynthGenerator, plan: Plan, out: Path, export: ExportSettings, run_uid: str,
                     rank: int, world_size: int, progress: Progress | None) -> SynthesisResult:
    """Generate, export and record this rank's unfinished batches (module docstring, step 3).

    On a GPU batch b + 1 is queued on the device (:meth:`SynthGenerator.submit`) before batch b's result is
    taken, so b's decode overlaps b + 1's sampling (on the CPU, where generating is synchronous, batches go
    one at a time); one thread saves batch b (exports, shards, parts file)
    while the main thread generates, so the device does not wait for the files. At most one batch is saved
    and two are generated at a time; an error in either stops the run after the batch being saved is
    finished or abandoned (its parts file is written last, so it then counts as unfinished).
    """
    writer = ShardWriter(out)
    mine = list(range(rank, plan.num_batches, world_size))
    pending = [b for b in mine if not writer.is_complete(layout.batch_id(run_uid, b))]
    result = SynthesisResult({}, skipped_batches=len(mine) - len(pending))
    exporters = _Exporters(out, export, plan, generator)
    start, total, clock = time.perf_counter(), sum(len(plan.batch(b)) for b in pending), time.perf_counter

    def finish(saving: Any, count: int) -> None:
        for stage, seconds in saving.result().items():
            result.stage_seconds[stage] += seconds
        result.generated += count
        if progress is not None:
            elapsed = clock() - start
            progress(result.generated, total, result.generated / elapsed if elapsed > 0 else 0.0)

    def submit(batch_index: int) -> tuple[int, Sequence[PlannedSample], Any]:
        samples, tick = plan.batch(batch_index), clock()
        queued = generator.submit(samples, plan.request.sampling)
        result.stage_seconds["generate"] += clock() - tick
        return batch_index, samples, queued

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medaug-save") as saver:
        in_flight, queued = None, None
        try:
            for position, batch_index in enumerate(pending):
                batch_index, samples, waiting = queued or submit(batch_index)
                ahead = generator.queues_on_device and position + 1 < len(pending)
                queued = submit(pending[position + 1]) if ahead else None
                tick = clock()
                batch = waiting.result()
                if position == 0:
                    result.first_batch_seconds, result.first_batch_samples = clock() - start, len(samples)
                samples, draws = redraw_missing(generator, samples, batch, plan.request.sampling, plan.request.redraws)
                for row, sample in enumerate(samples):  # past a domain's channels the shard holds zeros, as prepare's
                    batch.image_BCHW[row, len(generator.domains[sample.domain]["channels"]):] = 0.0
                result.stage_seconds["generate"] += clock() - tick
                if in_flight is not None:
                    saving, in_flight = in_flight, None
                    finish(*saving)
                in_flight = (saver.submit(save_batch, generator, plan, samples, batch, batch_index,
                                          layout.batch_id(run_uid, batch_index), exporters, writer, draws), len(samples))
        finally:  # the last save, or the one running when generation failed: its own error is raised too
            if in_flight is not None:
                finish(*in_flight)
    result.seconds = clock() - start
    return result


def shows_target(sample: PlannedSample, present: Sequence[str], pixels: Sequence[int], min_pixels: int) -> bool | None:
    """Whether a generated mask (its ``present`` names and their ``pixels``) shows ``sample``'s target: the
    target's structures cover at least ``min_pixels`` pixels together. None for a sample without a target."""
    if sample.target is None:
        return None
    wanted = set(sample.target_structures)
    return sum(count for name, count in zip(present, pixels) if name in wanted) >= min_pixels


def redraw_missing(generator: SynthGenerator, samples: Sequence[PlannedSample], batch: GeneratedBatch,
                   settings: Any, redraws: int) -> tuple[list[PlannedSample], list[int]]:
    """Draw again the samples of ``batch`` whose masks miss their targets (:func:`shows_target` with the
    generator's ``shown_min_pixels``), at most ``redraws`` times each, with seeds :func:`~medaug.synth.plan.draw_seed`;
    each new draw replaces its row of ``batch`` in place (image, label, present, pixels). Draw d of a batch
    samples together the rows that missed in draw d - 1, in batch order (what :func:`regenerate` repeats).
    Returns the samples with the kept draws' seeds and each sample's number of draws (1 = the first kept)."""
    kept, draws = list(samples), [1] * len(samples)
    min_pixels = generator.shown_min_pixels
    for draw in range(2, redraws + 2):
        missing = [row for row, sample in enumerate(samples)
                   if shows_target(sample, batch.present[row], batch.pixels[row], min_pixels) is False]
        if not missing:
            break
        again = [replace(samples[row], seed=draw_seed(samples[row].seed, draw)) for row in missing]
        fresh = generator.generate(again, settings)
        for j, row in enumerate(missing):
            batch.image_BCHW[row], batch.label_BHW[row] = fresh.image_BCHW[j], fresh.label_BHW[j]
            batch.present[row], batch.pixels[row] = fresh.present[j], fresh.pixels[j]
            kept[row], draws[row] = again[j], draw
    return kept, draws


def save_batch(generator: SynthGenerator, plan: Plan, samples: Sequence[PlannedSample], batch: GeneratedBatch,
               batch_index: int, bid: str, exporters: _Exporters, writer: ShardWriter,
               draws: Sequence[int]) -> dict[str, float]:
    """Export one generated batch, then write its shards and (last) its parts file; seconds per stage.
    ``draws``: each sample's number of draws (:func:`redraw_missing`)."""
    tick = time.perf_counter()
    slices = [export_slice(generator, sample, batch, position, bid) for position, sample in enumerate(samples)]
    exporters.write(slices)
    rows, tock = manifest_rows(generator, plan, samples, batch, batch_index, bid, draws), time.perf_counter()
    writer.write_volume(bid, batch.image_BCHW, batch.label_BHW, rows, extra_types=_EXTRA_TYPES)
    return {"export": tock - tick, "record": time.perf_counter() - tock}


_EXTRA_TYPES = {name: dtype for name, dtype, _ in layout.MANIFEST_COLUMNS}


class _Exporters:
    """The format writers of one run (nnU-Net: one dataset per domain, opened on first use)."""

    def __init__(self, out: Path, export: ExportSettings, plan: Plan, generator: SynthGenerator):
        self.out, self.export, self.plan, self.generator = out, export, plan, generator
        self.files = tuple(f for f in export.formats if f in ("png", "nifti", "dicom"))
        self._nnunet: dict[str, Any] = {}
        self._dicom = None
        if "dicom" in export.formats:
            from medaug.synth.export.dicom import DicomOptions

            state = json.loads((out / layout.SYNTHESIZE_JSON).read_text())
            name = "".join(c for c in f"medaug MedVAR {generator.run_dir.name}" if c.isascii() and c.isprintable()
                           and c != "\\")[:64]
            self._dicom = DicomOptions(model_name=name, model_sha256=generator.sha256, run_uid=state["run_uid"],
                                       created_at=datetime.fromisoformat(state["created_at"]), **(export.dicom or {}))

    def write(self, slices: Sequence[ExportSlice]) -> None:
        from medaug.synth.export.batch import export_batch

        if self.files:
            options = {"dicom": self._dicom} if self._dicom is not None else {}
            export_batch(slices, self.out, self.files, png=self.export.png, nifti=self.export.nifti,
                         workers=self.export.workers, **options)
        if "nnunet" in self.export.formats:
            for domain in sorted({s.domain for s in slices}):
                export_batch([s for s in slices if s.domain == domain], formats=("nnunet",),
                             nnunet=self.nnunet_dataset(domain), workers=self.export.workers)

    def nnunet_dataset(self, domain: str) -> Any:
        if domain not in self._nnunet:
            self._nnunet[domain] = open_domain_nnunet(self.out, self.generator, domain, self.export.nnunet_id)
        return self._nnunet[domain]


def nnunet_folder(out: Path, domain_names: Sequence[str], domain: str, first_id: int) -> Path:
    """``OUT/nnunet/Dataset{first_id + position}_medaug_{domain with / → _}``."""
    number = first_id + list(domain_names).index(domain)
    return out / NNUNET_DIR / f"Dataset{number:03d}_medaug_{domain.replace('/', '_')}"


def open_domain_nnunet(out: Path, generator: SynthGenerator, domain: str, first_id: int) -> Any:
    """The nnU-Net dataset of ``domain``'s samples: its channels and the structures its training rows annotate."""
    from medaug.synth.export.nnunet import open_nnunet_dataset

    record = generator.domains[domain]
    units = [m["units"] for m in export_intensity(record)]
    annotated = sorted({s for c in generator.bank.domains.get(domain, ()) for s in c.annotated})
    structures = generator.bank.names(annotated)
    return open_nnunet_dataset(nnunet_folder(out, generator.domain_names, domain, first_id), record["channels"],
                               units, structures or None, description=f"medaug synthetic {domain}")


def export_slice(generator: SynthGenerator, sample: PlannedSample, batch: GeneratedBatch, position: int,
                 series_key: str) -> ExportSlice:
    """The :class:`ExportSlice` of ``batch`` row ``position`` (the domain's channels, affine and units)."""
    domain = generator.domains[sample.domain]
    channels = tuple(domain["channels"])
    annotated = None if sample.unconditional else tuple(generator.bank.names(sample.annotated))
    return ExportSlice(sample_id=layout.sample_id(sample.index), image_CHW=batch.image_BCHW[position, :len(channels)],
                       label_HW=batch.label_BHW[position], channels=channels,
                       affine=export_affine(domain, generator.size), intensity=tuple(export_intensity(domain)),
                       structures=tuple(batch.present[position]), domain=sample.domain, annotated=annotated,
                       synthetic=True, series_key=series_key, instance_number=position + 1)


def manifest_rows(generator: SynthGenerator, plan: Plan, samples: Sequence[PlannedSample], batch: GeneratedBatch,
                  batch_index: int, bid: str, draws: Sequence[int]) -> list[dict[str, Any]]:
    """The index + synthesis columns of a batch (``medaug.synth.layout``); ``draws`` per sample."""
    created = _now()
    rows = []
    for position, sample in enumerate(samples):
        domain = generator.domains[sample.domain]
        present = batch.present[position]
        spacing = float(domain["spacing_mm"])
        image_CHW = batch.image_BCHW[position, :len(domain["channels"])]
        rows.append({
            "volume_id": bid, "dataset": layout.SYNTHETIC_DATASET, "subject": layout.sample_id(sample.index),
            "patient_group": layout.sample_id(sample.index), "split": None, "domain": sample.domain,
            "modality": domain["modality"].upper(), "channels": list(domain["channels"]),
            "source_image": [str(generator.run_dir)], "source_label": None, "slice_index": position,
            "plane": domain_plane(domain), "spacing_mm": [spacing, spacing], "slice_thickness_mm": spacing,
            "affine": export_affine(domain, generator.size), "intensity": export_intensity(domain),
            "body_fraction": float((image_CHW > BODY_THRESHOLD).any(axis=0).mean()),
            "structures_annotated": plan.names(sample.annotated) if not sample.unconditional else list(generator.table.names),
            "structures_present": present, "structure_pixels": batch.pixels[position], "fingerprint": None,
            "synthetic": True, **_synthesis_columns(generator, plan, sample, batch, batch_index, position, created),
            "draws": draws[position],
        })
    return rows


def _synthesis_columns(generator: SynthGenerator, plan: Plan, sample: PlannedSample, batch: GeneratedBatch,
                       batch_index: int, position: int, created: str) -> dict[str, Any]:
    settings = plan.request.sampling
    adherent = shows_target(sample, batch.present[position], batch.pixels[position], generator.shown_min_pixels)
    return {"sample_index": sample.index, "sample_id": layout.sample_id(sample.index), "target": sample.target,
            "target_structures": list(sample.target_structures), "condition_present": plan.names(sample.present),
            "condition_annotated": plan.names(sample.annotated), "unconditional": sample.unconditional,
            "seed": sample.seed, "cfg": settings.cfg, "top_k": settings.top_k, "top_p": settings.top_p,
            "temperature": settings.temperature, "batch_index": batch_index, "batch_size": plan.request.batch_size,
            "batch_position": position, "dtype": generator.dtype, "device": generator.device_label,
            "generator_sha256": generator.sha256, "created_at": created, "adherent": adherent}


# ---------------------------------------------------------------- the end of a run


def finalize(out: Path, plan: Plan, generator: SynthGenerator, export: ExportSettings, state: dict[str, Any],
             result: SynthesisResult) -> dict[str, Any]:
    """Rank 0 after every batch: manifest, montage, nnU-Net dataset.json, adherence, status complete."""
    from medaug.train.checkpoint import write_json

    table = assemble_index(out)
    table = table.take(pc.sort_indices(table, [("sample_index", "ascending")]))
    if table.num_rows != len(plan.samples) or table.column("sample_index").to_pylist() != list(range(len(plan.samples))):
        raise ConfigError(out, f"holds {table.num_rows} finished samples of {len(plan.samples)} planned; expected all "
                          "(run again with --resume)")
    write_index(table.combine_chunks(), layout.manifest_path(out))
    montage = write_run_montage(out, table, generator, export.montage)
    if "nnunet" in export.formats:
        for domain in sorted(set(table.column("domain").to_pylist())):
            open_domain_nnunet(out, generator, domain, export.nnunet_id).write_dataset_json()
    summary = {**state, "status": STATUS_COMPLETE, "finished_at": _now(), "samples": table.num_rows,
               "adherence": adherence(table), "montage": montage,
               "timing": {"seconds_rank0": round(result.seconds, 3), "generated_rank0": result.generated,
                          "first_batch_seconds_rank0": round(result.first_batch_seconds, 3),
                          "first_batch_samples_rank0": result.first_batch_samples,
                          "stage_seconds_rank0": {k: round(v, 3) for k, v in result.stage_seconds.items()}}}
    write_json(out / layout.SYNTHESIZE_JSON, summary)
    return summary


def adherence(table: pa.Table) -> dict[str, Any]:
    """Condition adherence (module docstring of ``medaug.synth``): per target, the fraction of its samples whose
    mask shows it (``adherent``), and ``first_draw``, the fraction whose first draw did (before redraws); per
    structure, the fraction of samples whose condition has it present that show it in the mask."""
    rows = table.select(["target", "adherent", "draws", "condition_present", "structures_present"]).to_pylist()
    targets: dict[str, list[bool]] = {}
    first: dict[str, list[bool]] = {}
    structures: dict[str, list[bool]] = {}
    for row in rows:
        if row["target"] is not None:
            targets.setdefault(row["target"], []).append(bool(row["adherent"]))
            first.setdefault(row["target"], []).append(bool(row["adherent"]) and row["draws"] == 1)
        shown = set(row["structures_present"])
        for name in row["condition_present"]:
            structures.setdefault(name, []).append(name in shown)
    summarize = lambda flags: {"samples": len(flags), "fraction": round(float(np.mean(flags)), 4)}  # noqa: E731
    return {"targets": {t: {**summarize(f), "first_draw": summarize(first[t])["fraction"]} for t, f in targets.items()},
            "structures": {s: summarize(f) for s, f in sorted(structures.items())}}


def write_run_montage(out: Path, table: pa.Table, generator: SynthGenerator, count: int) -> str | None:
    """``montage.png``: the first ``count`` samples (first channel) with their masks overlaid."""
    from medaug.data.dataset import PreparedSliceDataset
    from medaug.synth.export.png import write_montage

    if count <= 0 or table.num_rows == 0:
        return None
    dataset = PreparedSliceDataset(out)
    slices = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        domain = generator.domains[item["domain"]]
        channels = tuple(domain["channels"])
        slices.append(ExportSlice(sample_id=f"m{i}", image_CHW=item["image"][:len(channels)].numpy(),
                                  label_HW=item["label"].numpy(), channels=channels,
                                  affine=export_affine(domain, generator.size),
                                  intensity=tuple(export_intensity(domain)), domain=item["domain"]))
    return str(write_montage(slices, out / MONTAGE_FILE))


def regenerate(out: str | Path, sample_index: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Regenerate manifest row ``sample_index`` of the synthetic folder ``out`` from its recorded settings:
    (image (C_max, H, W) float32 model space, label (H, W) uint8 vocabulary ids).

    The batch that made the row is sampled again (same rows, order, seeds, guidance, filters, dtype): for a
    row kept at draw d (``draws``), the rows of its plan batch that were drawn a d-th time, i.e. those with
    ``draws >= d``, with their d-th seeds. On the machine and software that made it the result equals the
    stored sample exactly (engine module docstring).
    """
    import pyarrow.parquet as pq

    from medaug.synth.plan import SamplingSettings

    out = Path(out)
    manifest = read_manifest(out)
    position = pc.index(manifest.column("sample_index"), sample_index).as_py()
    if position < 0:
        raise ConfigError(layout.manifest_path(out), f"has no sample_index {sample_index}")
    row = manifest.slice(position, 1).to_pylist()[0]
    batch_rows = manifest.filter(pc.equal(manifest.column("batch_index"), row["batch_index"])).to_pylist()
    batch_rows.sort(key=lambda r: r["batch_position"])
    draw = row.get("draws") or 1
    if draw > 1:
        plan = pq.read_table(out / layout.PLAN_FILE, columns=["sample_index", "seed"]).to_pydict()
        first = dict(zip(plan["sample_index"], plan["seed"]))
        batch_rows = [{**r, "seed": draw_seed(first[r["sample_index"]], draw)} for r in batch_rows if r["draws"] >= draw]
    state = json.loads((out / layout.SYNTHESIZE_JSON).read_text())
    generator = SynthGenerator(state["generator"]["checkpoint"], device, row["dtype"], state["generator"]["weights"])
    if generator.sha256 != row["generator_sha256"]:
        raise ConfigError(state["generator"]["checkpoint"], "weights differ from the ones that made the sample")
    generator.adopt_decoder(state["settings"].get("decoder"))  # decode as the run did
    generator.adopt_sampler(state["settings"].get("sampler"))  # sample as the run did
    local = {name: i + 1 for i, name in enumerate(generator.bank.structures)}
    samples = [PlannedSample(index=r["sample_index"], domain=r["domain"], domain_index=generator.domain_names.index(r["domain"]),
                             seed=r["seed"], present=tuple(local[n] for n in r["condition_present"]),
                             annotated=tuple(local[n] for n in r["condition_annotated"]),
                             unconditional=r["unconditional"]) for r in batch_rows]
    settings = SamplingSettings(cfg=row["cfg"], top_k=row["top_k"], top_p=row["top_p"], temperature=row["temperature"])
    batch = generator.generate(samples, settings)
    position = [r["sample_index"] for r in batch_rows].index(sample_index)
    return batch.image_BCHW[position], batch.label_BHW[position]


def send_run(out: str | Path, destination: str, called_aet: str, calling_aet: str = "MEDAUG", retries: int = 2) -> Any:
    """C-STORE every DICOM file of the finished synthetic folder ``out`` to ``destination`` (``HOST:PORT``).

    Returns the :class:`~medaug.synth.send.SendReport`; a refused association or an unreachable node raises
    :class:`~medaug.synth.send.DicomSendError`. Nothing in ``out`` is changed either way.
    """
    from medaug.synth.send import send_dicom

    host, _, port = destination.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("--send", f"is {destination!r}; expected HOST:PORT, e.g. pacs.example.org:104")
    state_path = Path(out) / layout.SYNTHESIZE_JSON
    if not state_path.is_file() or json.loads(state_path.read_text()).get("status") != STATUS_COMPLETE:
        raise ConfigError(out, "is not a finished synthesis run; expected one to send")
    files = sorted((Path(out) / "dicom").rglob("*.dcm"))
    if not files:
        raise ConfigError(Path(out) / "dicom", "holds no DICOM files; expected a run with --format dicom")
    return send_dicom(files, host, int(port), called_aet, calling_aet=calling_aet, retries=retries)


def read_manifest(out: str | Path) -> pa.Table:
    """``manifest.parquet`` of a finished synthetic folder (index schema + synthesis columns)."""
    return read_index(layout.manifest_path(out))


__all__ = ["ExportSettings", "FORMATS", "INDEX_SCHEMA_VERSION", "SynthesisResult", "adherence", "claim_folder",
           "export_slice", "finalize", "generate_batches", "manifest_rows", "plan_sha256", "read_manifest", "regenerate", "send_run",
           "synthesize"]
