"""Export a batch of samples in several formats at once, skipping what a previous run finished.

Folders under ``out_dir``: ``png/`` (:mod:`~medaug.synth.export.png`), ``nifti/``
(:mod:`~medaug.synth.export.nifti`) and ``dicom/`` (:mod:`~medaug.synth.export.dicom`); the ``nnunet``
format writes into an open :class:`~medaug.synth.export.nnunet.NnunetDataset` wherever that lives.

Resume: every file is written under a temporary name and renamed, so a file that exists is complete. A
sample whose files of a format all exist is not written again in that format; a sample complete in every
format is reported as skipped. Samples are written by ``workers`` threads that share one job queue. The
heavy steps (numpy, zlib, ``writev``) release the GIL, but the Python between them does not. On the 2-core
sandbox 2 threads ran at 0.7-1.25× the rate of 1 (``benchmarks/export.py``, PNG and NIfTI; about 25 % more
CPU time per slice), and 2 processes were no faster than 1 thread either: its two vCPUs give this
memory-bound work about one core's throughput (at times even 2 threads of ``zlib.crc32`` alone, which
holds no GIL, ran no faster than 1). Under ``torchrun`` every rank exports its own samples, which is where
real cores pay off.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from medaug.synth.export.base import ExportError, ExportSlice
from medaug.synth.export.dicom import DicomOptions, dicom_paths, write_dicom_sample
from medaug.synth.export.nifti import NiftiOptions, nifti_paths, write_nifti_sample
from medaug.synth.export.png import PngOptions, png_paths, write_png_files

if TYPE_CHECKING:
    from medaug.synth.export.nnunet import NnunetDataset

log = logging.getLogger(__name__)

FORMATS = ("png", "nifti", "dicom", "nnunet")
PNG_DIR, NIFTI_DIR, DICOM_DIR = "png", "nifti", "dicom"
OUT_DIR_FORMATS = {"png", "nifti", "dicom"}


@dataclass
class BatchExport:
    """What :func:`export_batch` did.

    Attributes:
        paths: per sample id (input order), every file of the sample in the requested formats.
        written: ids of samples with at least one format written now.
        skipped: ids of samples complete in every format before the call.
    """

    paths: dict[str, list[Path]] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Format:
    """One output format: where a sample's files go and how to write them."""

    paths: Callable[[ExportSlice], list[Path]]
    write: Callable[[ExportSlice, list[Path]], object]  # (sample, its paths as ``paths`` gave them)


Job = tuple[Callable[[ExportSlice, list[Path]], object], ExportSlice, list[Path]]  # write, sample, its paths


def export_batch(samples: Sequence[ExportSlice], out_dir: str | Path | None = None,
                 formats: Sequence[str] = ("png", "nifti"), *, png: PngOptions = PngOptions(),
                 nifti: NiftiOptions = NiftiOptions(), dicom: DicomOptions | None = None,
                 nnunet: NnunetDataset | None = None, workers: int = 2) -> BatchExport:
    """Write ``samples`` in ``formats`` (``png``, ``nifti``, ``dicom``, ``nnunet``); returns the paths per sample.

    ``out_dir`` holds the ``png/``, ``nifti/`` and ``dicom/`` folders; ``dicom`` says what the DICOM files
    record (model, hash, run) and is required by the ``dicom`` format; ``nnunet`` is the dataset the
    ``nnunet`` format adds cases to (its ``dataset.json`` is rewritten at the end). Files that exist are
    kept (module docstring). Raises :class:`ExportError` for an unknown format, a missing
    ``out_dir``/``dicom``/``nnunet``, or a sample id given twice.
    """
    writers = _formats(formats, out_dir, png, nifti, dicom, nnunet)
    ids = [sample.sample_id for sample in samples]
    if len(set(ids)) != len(ids):
        raise ExportError("export batch", "a sample id occurs twice; expected distinct sample ids")
    result = BatchExport()
    jobs: list[Job] = []
    for sample in samples:
        paths = [writer.paths(sample) for writer in writers]
        pending = [(writer.write, sample, files) for writer, files in zip(writers, paths)
                   if not all(path.is_file() for path in files)]
        result.paths[sample.sample_id] = [path for files in paths for path in files]
        (result.written if pending else result.skipped).append(sample.sample_id)
        jobs += pending
    _run(jobs, workers)
    if nnunet is not None:
        nnunet.write_dataset_json()
    if result.skipped:
        log.info("export: %d of %d samples were already complete", len(result.skipped), len(samples))
    return result


def _formats(formats: Sequence[str], out_dir: str | Path | None, png: PngOptions, nifti: NiftiOptions,
             dicom: DicomOptions | None, nnunet: NnunetDataset | None) -> list[_Format]:
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ExportError("formats", f"{list(formats)}; expected one or more of {', '.join(FORMATS)}")
    if out_dir is None and OUT_DIR_FORMATS & set(formats):
        raise ExportError("out_dir", "is missing; expected the folder for the png/, nifti/ and dicom/ files")
    if "dicom" in formats and dicom is None:
        raise ExportError("dicom", "format dicom needs DicomOptions (model name, model sha256, run uid)")
    if "nnunet" in formats and nnunet is None:
        raise ExportError("nnunet", "format nnunet needs an open dataset (open_nnunet_dataset)")
    writers = []
    if "png" in formats:
        png_dir = Path(out_dir) / PNG_DIR
        writers.append(_Format(lambda s: png_paths(s.sample_id, s.channels, png_dir),
                               lambda s, files: write_png_files(s, files, png)))
    if "nifti" in formats:
        nifti_dir = Path(out_dir) / NIFTI_DIR
        writers.append(_Format(lambda s: nifti_paths(s.sample_id, s.channels, nifti_dir, nifti.suffix),
                               lambda s, _: write_nifti_sample(s, nifti_dir, nifti)))
    if "dicom" in formats:
        dicom_dir = Path(out_dir) / DICOM_DIR
        writers.append(_Format(lambda s: dicom_paths(s, dicom_dir, dicom),
                               lambda s, _: write_dicom_sample(s, dicom_dir, dicom)))
    if "nnunet" in formats:
        writers.append(_Format(lambda s: nnunet.case_paths(nnunet.case_id(s)), lambda s, _: nnunet.add(s)))
    return writers


def _run(jobs: list[Job], workers: int) -> None:
    """Run ``write(sample, paths)`` for every job, on ``workers`` threads (inline for one); errors propagate.

    Each thread takes the next job from one shared queue until it is empty (one task per thread, not one
    per job: a future per job cost about 10 µs of CPU, 1-2 % of a PNG sample); a thread whose job raises
    stops, the others finish the queue, then the error is raised.
    """
    if workers <= 1 or len(jobs) <= 1:
        for write, sample, files in jobs:
            write(sample, files)
        return
    queued: queue.SimpleQueue = queue.SimpleQueue()
    for job in jobs:
        queued.put(job)

    def drain() -> None:
        while True:
            try:
                write, sample, files = queued.get_nowait()
            except queue.Empty:
                return
            write(sample, files)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(drain) for _ in range(min(workers, len(jobs)))]:
            future.result()
